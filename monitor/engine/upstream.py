"""The `upstream` engine: the model is served elsewhere; a local reader model reads its CoT.

Requests go to an OpenAI-compatible server (e.g. stock `vllm serve --reasoning-parser
deepseek_r1`, or another cotmon). Its streamed reasoning — from `delta.reasoning`,
`delta.reasoning_content`, or `<think>…</think>` inside `delta.content` — and its answer are
teacher-forced, piece by piece, through a local reader model (the same weights, or a smaller
model) whose forward hooks compute the readouts. Closing the stream (a halt) closes the
upstream request, so the upstream server stops generating too.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import httpx

from monitor.engine.base import EngineError
from monitor.engine.hf import HFEngine
from monitor.engine.text import THINK_CLOSE, THINK_OPEN
from monitor.types import AnyReadout, ChatMessage, GenerationRequest, TraceStep


class UpstreamError(EngineError):
    """The upstream server refused the request or broke off; carries its HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class UpstreamEngine:
    """Forwards generation to `url` (the upstream's `/v1` base) and reads it with `reader`."""

    def __init__(self, url: str, reader: HFEngine, *, model: str, api_key: str | None = None, timeout: float = 600.0):
        self.url = url.rstrip("/")
        self.reader = reader
        self.model = model
        self.info = reader.info
        self.context_length = reader.context_length
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = httpx.Timeout(timeout, connect=10.0)

    def install(self, readouts: Sequence[AnyReadout]) -> None:
        self.reader.install(readouts)

    def prompt_opens_reasoning(self, messages: Sequence[ChatMessage]) -> bool:
        return self.reader.prompt_opens_reasoning(messages)

    def prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return self.reader.prompt_tokens(messages)

    def text_tokens(self, text: str) -> int:
        return self.reader.text_tokens(text)

    def _payload(self, request: GenerationRequest) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": [m.to_dict() for m in request.messages],
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stream": True,
        }
        if request.seed is not None:
            payload["seed"] = request.seed
        if request.ignore_eos:
            payload["ignore_eos"] = True  # a vLLM extension, which cotmon also accepts
        return payload

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[TraceStep, None]:
        session_id = request.session_id or uuid.uuid4().hex
        forcer = self.reader.forcer(request.messages, session_id)
        text = _ReaderText(self.reader.prompt_opens_reasoning(request.messages))
        try:
            async with (
                httpx.AsyncClient(timeout=self._timeout, headers=self._headers) as client,
                client.stream("POST", f"{self.url}/chat/completions", json=self._payload(request)) as response,
            ):
                if response.status_code != 200:
                    body = (await response.aread()).decode(errors="replace")[:500]
                    raise UpstreamError(response.status_code, f"upstream answered {response.status_code}: {body}")
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    for piece in text.pieces(_delta(data)):
                        for step in await forcer.feed(piece):
                            yield step
        except httpx.HTTPError as exc:
            raise UpstreamError(502, f"upstream {self.url} failed: {type(exc).__name__}: {exc}") from exc
        for step in await forcer.finish():
            yield step

    def teacher_force(
        self, messages: Sequence[ChatMessage], assistant_text: str, session_id: str = ""
    ) -> AsyncGenerator[TraceStep, None]:
        return self.reader.teacher_force(messages, assistant_text, session_id)

    def force_tokens(
        self, messages: Sequence[ChatMessage], token_ids: Sequence[int], session_id: str = "", *, stepwise: bool = False
    ) -> AsyncGenerator[TraceStep, None]:
        """Replays read stored tokens with the reader; the upstream is not asked."""
        return self.reader.force_tokens(messages, token_ids, session_id, stepwise=stepwise)


def _delta(data: str) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except json.JSONDecodeError as exc:
        raise UpstreamError(502, f"upstream sent a chunk that is not JSON: {data[:200]!r}") from exc
    choices = chunk.get("choices") or [{}]
    delta = choices[0].get("delta") or {}
    return delta if isinstance(delta, dict) else {}


class _ReaderText:
    """Rebuilds the generated text, think tags included, from reasoning/content deltas."""

    def __init__(self, prompt_opens_reasoning: bool):
        self._opened = prompt_opens_reasoning
        self._in_reasoning_field = False

    def pieces(self, delta: dict[str, Any]) -> list[str]:
        out = []
        reasoning = delta.get("reasoning") or delta.get("reasoning_content")
        if isinstance(reasoning, str) and reasoning:
            if not self._in_reasoning_field and not self._opened:
                out.append(THINK_OPEN)
            self._in_reasoning_field = True
            out.append(reasoning)
        content = delta.get("content")
        if isinstance(content, str) and content:
            if self._in_reasoning_field:
                out.append(THINK_CLOSE)  # the server's reasoning parser cut the tag: put it back
                self._in_reasoning_field = False
            out.append(content)
        return out
