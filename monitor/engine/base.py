"""The engine contract: where tokens and their readouts come from.

Every engine (hf, vllm, upstream, replay) yields the same stream of `TraceStep`s, so everything
downstream is shared. Halting and cancelling a stream is closing its async iterator: an engine
computes the next token only when the consumer asks for the next step.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Protocol

from monitor.types import AnyReadout, ChatMessage, GenerationRequest, ModelInfo, TraceStep


class EngineError(RuntimeError):
    """The engine cannot do what was asked (model not loadable, readouts that do not fit)."""


class Engine(Protocol):
    """Generates or teacher-forces tokens and computes the installed readouts on device."""

    info: ModelInfo
    context_length: int | None
    """Most tokens (prompt and text) the model reads in one sequence; None when the engine does not say."""

    def install(self, readouts: Sequence[AnyReadout]) -> None:
        """Compile `readouts` into the fused on-device readout; replaces what was installed."""
        ...

    def prompt_opens_reasoning(self, messages: Sequence[ChatMessage]) -> bool:
        """Whether the chat template leaves a `<think>` block open for the generation."""
        ...

    def prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Length of the rendered prompt in tokens (for usage accounting and the prompt limit)."""
        ...

    def text_tokens(self, text: str) -> int:
        """Length of an assistant text in tokens (watch mode's transcript limit)."""
        ...

    def stream(self, request: GenerationRequest) -> AsyncGenerator[TraceStep, None]:
        """Generate for `request`, one step per token. Closing the iterator stops generation."""
        ...

    def teacher_force(
        self, messages: Sequence[ChatMessage], assistant_text: str, session_id: str = ""
    ) -> AsyncGenerator[TraceStep, None]:
        """The steps the model would produce had it generated `assistant_text` itself."""
        ...

    def force_tokens(
        self, messages: Sequence[ChatMessage], token_ids: Sequence[int], session_id: str = "", *, stepwise: bool = False
    ) -> AsyncGenerator[TraceStep, None]:
        """Teacher-force exact token ids (a stored session's); `stepwise` feeds them one at a time
        with a KV cache, the arithmetic of generation, so a generated session's readouts come back
        bit for bit; otherwise in one forward, as `teacher_force` does."""
        ...
