"""Many clients at once: all complete; beyond the configured limit, a 429 with Retry-After."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator
from typing import Any

import httpx
import openai

from conftest import Serve
from monitor.engine.hf import HFEngine
from monitor.testing import ScriptedEngine
from monitor.types import TraceStep

MESSAGES: list[Any] = [{"role": "user", "content": "Summarise the incident."}]


async def _one_stream(client: openai.AsyncOpenAI) -> str:
    stream = await client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0.7, stream=True)
    finish = ""
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    return finish


def test_32_concurrent_streaming_clients_all_finish(serve: Serve) -> None:
    server = serve(max_concurrent=32)

    async def run() -> list[str | BaseException]:
        async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=120) as client:
            return await asyncio.gather(*[_one_stream(client) for _ in range(32)], return_exceptions=True)

    results = asyncio.run(run())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == [] and all(r in ("stop", "length") for r in results)
    assert server.metrics.registry.get_sample_value("cotmon_sessions_total", {"outcome": "completed"}) == 32


class GatedEngine(ScriptedEngine):
    """Holds every stream before its first token until the gate opens, so streams pile up."""

    def __init__(self, gate: threading.Event):
        super().__init__([("x", "answer")] * 3)
        self.gate = gate

    async def _play(self, session_id: str) -> AsyncGenerator[TraceStep, None]:
        while not self.gate.is_set():
            await asyncio.sleep(0.005)
        async for step in super()._play(session_id):
            yield step


def test_beyond_the_limit_a_request_gets_429_with_retry_after(serve: Serve, engine: HFEngine) -> None:
    gate = threading.Event()
    server = serve(use_engine=GatedEngine(gate), max_concurrent=32, max_queued=0)
    payload = {"model": "tiny", "messages": MESSAGES, "max_tokens": 3, "stream": True}

    async def run() -> tuple[list[int], httpx.Response]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            held = [asyncio.create_task(client.post("/v1/chat/completions", json=payload)) for _ in range(32)]
            while server.admission.inside < 32:
                await asyncio.sleep(0.01)
            extra = await client.post("/v1/chat/completions", json=payload)
            gate.set()
            return [r.status_code for r in await asyncio.gather(*held)], extra

    statuses, extra = asyncio.run(run())
    assert extra.status_code == 429 and extra.headers["retry-after"] == "1"
    assert extra.json()["error"]["type"] == "rate_limit_error"
    assert statuses == [200] * 32


def test_queued_requests_wait_for_a_slot_and_the_next_one_is_refused(serve: Serve) -> None:
    gate = threading.Event()
    server = serve(use_engine=GatedEngine(gate), max_concurrent=1, max_queued=1)
    payload = {"model": "tiny", "messages": MESSAGES, "max_tokens": 3}

    async def run() -> tuple[list[int], int]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            first = asyncio.create_task(client.post("/v1/chat/completions", json=payload))
            queued = asyncio.create_task(client.post("/v1/chat/completions", json=payload))
            while server.admission.inside < 2:
                await asyncio.sleep(0.01)
            refused = await client.post("/v1/chat/completions", json=payload)
            gate.set()
            return [r.status_code for r in await asyncio.gather(first, queued)], refused.status_code

    served, refused = asyncio.run(run())
    assert served == [200, 200] and refused == 429
