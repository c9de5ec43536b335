"""Token limits: a prompt or watch transcript over them is a fast 400 naming the limit, before any slot."""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai
import pytest

from conftest import Serve
from monitor.engine.hf import HFEngine
from monitor.types import ChatMessage

SHORT: list[Any] = [{"role": "user", "content": "Did the deployment succeed?"}]


def _prompt_tokens(engine: HFEngine, content: str) -> int:
    return engine.prompt_tokens([ChatMessage("user", content)])


def test_an_over_limit_prompt_is_refused_fast_without_taking_a_slot(serve: Serve, engine: HFEngine) -> None:
    server = serve(max_concurrent=1, max_queued=0, max_prompt_tokens=1000)
    holding = {"model": "tiny", "messages": SHORT, "max_tokens": 4000, "stream": True, "ignore_eos": True}
    huge = "x" * 100_000
    with (
        httpx.stream("POST", server.base_url + "/v1/chat/completions", json=holding) as held,
        openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0) as client,
    ):
        lines = held.iter_lines()  # kept: dropping the iterator would close the stream
        next(lines)  # the only slot is taken: a request that waited for one would get a 429
        start = time.monotonic()
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": huge}])
        seconds = time.monotonic() - start
    assert refused.value.body == {
        "message": f"prompt is {_prompt_tokens(engine, huge)} tokens; the limit is 1000 (COTMON_MAX_PROMPT_TOKENS)",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }
    assert seconds < 1.0


@pytest.mark.parametrize("over", [0, 1])
def test_the_prompt_limit_is_the_model_context_when_that_is_smaller(serve: Serve, engine: HFEngine, over: int) -> None:
    server = serve()  # max_prompt_tokens is 8192; the tiny model's context is 4096 tokens
    content = "y" * (4096 - _prompt_tokens(engine, "") + over)
    payload = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 1}
    reply = httpx.post(server.base_url + "/v1/chat/completions", json=payload)
    if not over:
        assert reply.status_code == 200
    else:
        assert reply.status_code == 400
        assert reply.json()["error"]["message"] == "prompt is 4097 tokens; the limit is 4096 (the model's context length)"


@pytest.mark.parametrize(
    ("body", "param", "limit"),
    [
        ({"completion": "z" * 501}, "completion", "500 (COTMON_MAX_TRANSCRIPT_TOKENS)"),
        ({"reasoning": "z" * 400, "answer": "z" * 101}, "reasoning", "500 (COTMON_MAX_TRANSCRIPT_TOKENS)"),
    ],
)
def test_an_over_limit_watch_transcript_is_a_400_naming_the_field(
    serve: Serve, body: dict[str, str], param: str, limit: str
) -> None:
    server = serve(max_transcript_tokens=500)
    reply = httpx.post(server.base_url + "/v1/monitor/transcripts", json={"messages": SHORT, **body})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] == param and error["code"] == "context_length_exceeded"
    assert error["message"].startswith("transcript is ") and error["message"].endswith(f"; the limit is {limit}")


def test_a_watch_transcript_must_fit_the_context_after_its_prompt(serve: Serve, engine: HFEngine) -> None:
    server = serve()
    prompt = _prompt_tokens(engine, SHORT[0]["content"])
    body = {"messages": SHORT, "completion": "z" * (4096 - prompt + 1)}
    reply = httpx.post(server.base_url + "/v1/monitor/transcripts", json=body)
    assert reply.status_code == 400
    assert reply.json()["error"]["message"] == (
        f"transcript is {4097 - prompt} tokens; the limit is {4096 - prompt} "
        f"(the model's context length of 4096 less the prompt's {prompt} tokens)"
    )
