"""Fakes shipped with cotmon, for its own tests and for users testing their detectors/policies.

`ScriptedEngine` plays back fixed readout values token by token through the real Engine
protocol, so a policy or detector can be exercised without a model. It records how many steps
were pulled from it, which is how tests check that a halt stopped generation.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence

from monitor.types import ChatMessage, GenerationRequest, ModelInfo, Readout, TraceStep

SCRIPTED_MODEL = ModelInfo(model_id="scripted", revision="0", d_model=8, n_layers=2)


class ScriptedEngine:
    """An engine whose tokens and readout values are given in advance.

    Args:
        tokens: (text, channel) per step.
        readouts: one mapping of readout name -> value per step; names not installed are dropped.
        info: the ModelInfo detectors will see.
    """

    def __init__(
        self,
        tokens: Sequence[tuple[str, str]],
        readouts: Sequence[Mapping[str, float]] | None = None,
        info: ModelInfo = SCRIPTED_MODEL,
    ):
        self.info = info
        self.tokens = list(tokens)
        self.values = list(readouts) if readouts is not None else [{} for _ in tokens]
        if len(self.values) != len(self.tokens):
            raise ValueError("ScriptedEngine needs one readout mapping per token")
        self.installed: tuple[Readout, ...] = ()
        self.pulled = 0
        """Steps handed out so far, over all streams."""

    def install(self, readouts: Sequence[Readout]) -> None:
        self.installed = tuple(readouts)

    async def _play(self, session_id: str) -> AsyncGenerator[TraceStep, None]:
        names = {r.name for r in self.installed}
        last = len(self.tokens) - 1
        for i, ((text, channel), values) in enumerate(zip(self.tokens, self.values, strict=True)):
            self.pulled += 1
            readouts = {k: v for k, v in values.items() if k in names}
            yield TraceStep(session_id, i, i, text, "answer" if channel == "answer" else "reasoning", readouts, i == last)

    def stream(self, request: GenerationRequest) -> AsyncGenerator[TraceStep, None]:
        return self._play(request.session_id)

    def teacher_force(
        self, messages: Sequence[ChatMessage], assistant_text: str, session_id: str = ""
    ) -> AsyncGenerator[TraceStep, None]:
        return self._play(session_id)
