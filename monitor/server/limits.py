"""What one request may cost the engine: token limits checked before it takes a slot, and work
cancelled when its client leaves.

Reading a prompt costs time and memory that grow with its length (attention: quadratically), so
prompts and watch transcripts are counted with the model's own tokenizer, off the event loop
(a 1 MB body takes well under a second), and refused with OpenAI's 400
`context_length_exceeded` when over the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from starlette.requests import Request

from monitor.engine.base import Engine
from monitor.server.protocol import APIError
from monitor.settings import Settings
from monitor.types import ChatMessage

T = TypeVar("T")

CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
"""OpenAI's error code for the same refusal, which clients already handle."""


@dataclass(frozen=True)
class TokenLimits:
    """Counts a request's tokens with `engine`'s tokenizer and refuses what is over the limits."""

    engine: Engine
    max_prompt: int
    """COTMON_MAX_PROMPT_TOKENS."""
    max_transcript: int
    """COTMON_MAX_TRANSCRIPT_TOKENS."""

    @classmethod
    def of(cls, settings: Settings, engine: Engine) -> TokenLimits:
        return cls(engine, settings.max_prompt_tokens, settings.max_transcript_tokens)

    async def prompt(self, messages: Sequence[ChatMessage]) -> int:
        """The rendered prompt's length in tokens; a 400 when over max_prompt or the model's context."""
        tokens = await asyncio.to_thread(self.engine.prompt_tokens, messages)
        context = self.engine.context_length
        if context is not None and context < self.max_prompt:
            limit, source = context, "the model's context length"
        else:
            limit, source = self.max_prompt, "COTMON_MAX_PROMPT_TOKENS"
        if tokens > limit:
            raise _too_long(f"prompt is {tokens} tokens; the limit is {limit} ({source})", "messages")
        return tokens

    async def transcript(self, text: str, prompt_tokens: int, field: str) -> int:
        """A watch transcript's length in tokens; a 400 naming `field` when over max_transcript, or
        when it does not fit the model's context after its prompt of `prompt_tokens`."""
        tokens = await asyncio.to_thread(self.engine.text_tokens, text)
        limit, source = self.max_transcript, "COTMON_MAX_TRANSCRIPT_TOKENS"
        context = self.engine.context_length
        if context is not None and context - prompt_tokens < limit:
            limit = context - prompt_tokens
            source = f"the model's context length of {context} less the prompt's {prompt_tokens} tokens"
        if tokens > limit:
            raise _too_long(f"transcript is {tokens} tokens; the limit is {limit} ({source})", field)
        return tokens


def _too_long(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code=CONTEXT_LENGTH_EXCEEDED)


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or `work` cancelled (and a 499) as soon as the client disconnects.

    A streamed response is cancelled by Starlette when its client leaves; a plain one is not,
    and would keep the engine reading for nobody. The engine stops within one chunk or token.
    """
    task = asyncio.ensure_future(work)
    left = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait((task, left), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, left):
            pending.cancel()
    if not task.done() or task.cancelled():
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise APIError(499, "the client closed the request", code="client_closed_request")
    return task.result()


async def _disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
