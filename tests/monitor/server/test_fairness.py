"""A long prompt shares the engine: short requests are served meanwhile, and a client that leaves frees it.

The model is the tiny one made wider and deeper, so that reading an 8000-token prompt takes
seconds on CPU (the tiny model itself reads its whole context in a fraction of a second).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import openai
import pytest

from conftest import Serve
from monitor.engine.hf import HFEngine
from monitor.engine.tiny import build_model, build_tiny_tokenizer, tiny_config
from monitor.types import ModelInfo

LONG: list[Any] = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 175}]  # ~7900 tokens
SHORT: list[Any] = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def wide_engine() -> HFEngine:
    tokenizer = build_tiny_tokenizer()
    config = tiny_config(
        len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=8, max_position_embeddings=16384
    )
    model = build_model(config, seed=0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return HFEngine(model, tokenizer, ModelInfo("wide", "seed0", 128, 8))


async def _short_request_seconds(server: Any) -> float:
    async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0) as client:
        start = time.monotonic()
        await client.chat.completions.create(model="tiny", messages=SHORT, max_tokens=2, temperature=0)
        return time.monotonic() - start


def test_a_short_request_is_served_while_a_long_prompt_is_being_read(serve: Serve, wide_engine: HFEngine) -> None:
    server = serve(use_engine=wide_engine)

    async def run() -> tuple[float, bool, float]:
        async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0) as client:
            start = time.monotonic()
            long = asyncio.create_task(client.chat.completions.create(model="tiny", messages=LONG, max_tokens=1))
            while server.admission.inside == 0:
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.1)  # the long prompt is being read now
            short_s = await _short_request_seconds(server)
            long_running = not long.done()
            await long
            return short_s, long_running, time.monotonic() - start

    short_s, long_running, long_s = asyncio.run(run())
    print(f"short request {short_s:.2f} s while a long one ran {long_s:.2f} s")
    assert long_running, f"the short request ({short_s:.2f} s) waited for the long one ({long_s:.2f} s)"
    assert short_s < 1.5


def test_a_client_that_leaves_during_a_long_prefill_frees_the_engine(serve: Serve, wide_engine: HFEngine) -> None:
    server = serve(use_engine=wide_engine)
    payload = {"model": "tiny", "messages": LONG, "max_tokens": 1, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=payload) as reply:
        lines = reply.iter_lines()  # kept: dropping the iterator would close the stream
        next(lines)  # the role chunk: the prompt is being read from now on
        time.sleep(0.2)
    short_s = asyncio.run(_short_request_seconds(server))
    print(f"short request {short_s:.2f} s after the long one's client left")
    assert short_s < 1.0
    assert server.metrics.registry.get_sample_value("cotmon_sessions_total", {"outcome": "aborted"}) == 1


def test_a_watch_request_whose_client_leaves_stops_being_read(serve: Serve, wide_engine: HFEngine) -> None:
    server = serve(use_engine=wide_engine)
    body = {"messages": SHORT, "completion": LONG[0]["content"]}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/v1/monitor/transcripts", json=body, timeout=0.3)
    left = time.monotonic()
    aborted = None
    while not aborted and time.monotonic() - left < 1.0:
        aborted = server.metrics.registry.get_sample_value("cotmon_sessions_total", {"outcome": "aborted"})
        time.sleep(0.01)
    assert aborted == 1, "the transcript was read on after its client left"
