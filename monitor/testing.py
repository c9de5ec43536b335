"""Fakes shipped with cotmon, for its own tests and for users testing their detectors/policies.

`ScriptedEngine` plays back fixed readout values token by token through the real Engine
protocol, so a policy or detector can be exercised without a model. It records how many steps
were pulled from it, which is how tests check that a halt stopped generation. `ServerThread`
serves an app on a loopback port for tests that use real HTTP clients.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

from monitor.types import AnyReadout, ChatMessage, GenerationRequest, ModelInfo, Readout, TraceStep

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
        self.installed: tuple[AnyReadout, ...] = ()
        self.pulled = 0
        """Steps handed out so far, over all streams."""

    def install(self, readouts: Sequence[AnyReadout]) -> None:
        self.installed = tuple(readouts)

    async def _play(self, session_id: str) -> AsyncGenerator[TraceStep, None]:
        names = {n for r in self.installed for n in ((r.name,) if isinstance(r, Readout) else r.names)}
        last = len(self.tokens) - 1
        for i, ((text, channel), values) in enumerate(zip(self.tokens, self.values, strict=True)):
            self.pulled += 1
            readouts = {k: v for k, v in values.items() if k in names}
            yield TraceStep(session_id, i, i, text, "answer" if channel == "answer" else "reasoning", readouts, i == last)

    def prompt_opens_reasoning(self, messages: Sequence[ChatMessage]) -> bool:
        return True

    def prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return sum(len(m.content.split()) for m in messages)

    def stream(self, request: GenerationRequest) -> AsyncGenerator[TraceStep, None]:
        return self._play(request.session_id)

    def teacher_force(
        self, messages: Sequence[ChatMessage], assistant_text: str, session_id: str = ""
    ) -> AsyncGenerator[TraceStep, None]:
        return self._play(session_id)


class ServerThread:
    """Runs an ASGI app with uvicorn on a free loopback port in a background thread.

    Use as a context manager; `base_url` is ``http://127.0.0.1:PORT``. Meant for tests that drive
    cotmon with real HTTP clients (the official `openai` client, httpx).
    """

    def __init__(self, app: Any, host: str = "127.0.0.1"):
        import uvicorn

        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=0, log_level="warning", access_log=False))
        self._thread = threading.Thread(target=self._server.run, name="cotmon-test-server", daemon=True)
        self.base_url = ""

    def __enter__(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        host, port = self._server.servers[0].sockets[0].getsockname()[:2]
        self.base_url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
