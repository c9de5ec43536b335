"""What tests do to a running cotmon server from outside, through its public API: a streamed chat with
the official openai client, and a bundled example posted to watch mode."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
from openai import OpenAI
from openai.types.chat import ChatCompletionChunk

from probes.datasets import Example


@dataclass(frozen=True)
class StreamedChat:
    models: list[str]
    """What `/v1/models` listed."""
    chunks: list[ChatCompletionChunk]
    reasoning: str
    answer: str


def stream_chat(base_url: str, model: str, content: str, max_tokens: int) -> StreamedChat:
    """One greedy streamed chat turn through the official openai client, split into its two channels."""
    with OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0) as client:
        models = [m.id for m in client.models.list()]
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": content}],
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
        )
        chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join((d.model_extra or {}).get("reasoning") or "" for d in deltas)
    return StreamedChat(models, chunks, reasoning, "".join(d.content or "" for d in deltas))


def watch_example(base_url: str, example: Example, *, timeout: float = 300) -> dict[str, Any]:
    """POST a bundled example to watch mode, labelled with its id; the 200 reply's body."""
    body = {
        "messages": [m.to_dict() for m in example.messages],
        "reasoning": example.reasoning,
        "answer": example.answer,
        "label": example.id,
    }
    reply = httpx.post(base_url + "/v1/monitor/transcripts", json=body, timeout=timeout)
    assert reply.status_code == 200, reply.text
    result: dict[str, Any] = reply.json()
    return result
