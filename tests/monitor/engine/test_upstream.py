"""Upstream mode: cotmon proxies another OpenAI-compatible server (here, a second real cotmon)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai

from conftest import HALT_AT_FIFTH, ProbeFactory, Serve
from monitor.engine.hf import HFEngine
from monitor.engine.upstream import UpstreamEngine
from monitor.observability import Metrics
from monitor.pipeline import Pipeline
from monitor.policy import parse_policy
from monitor.types import ChatMessage, DetectorSpec

MESSAGES: list[Any] = [{"role": "user", "content": "Explain what you changed in the billing job."}]
RULES = [
    {
        "name": "peak",
        "category": "deception",
        "severity": "warning",
        "when": {"detector": "p", "stat": "max", "window": 8, "gte": 0.5},
        "actions": ["alert", "store"],
    },
    {
        "name": "sustained",
        "category": "deception",
        "severity": "critical",
        "when": {"detector": "p", "stat": "count_over", "over": 0.5, "window": 16, "gte": 8},
        "actions": ["alert", "store"],
    },
]


def test_upstream_flags_equal_in_process_flags_for_the_same_transcript(
    serve: Serve, make_probe: ProbeFactory, metrics: Metrics
) -> None:
    upstream = serve(use_engine=HFEngine.load("tiny"))  # no detectors: a plain model server
    reader = HFEngine.load("tiny")
    proxy = serve(rules=RULES, use_engine=UpstreamEngine(upstream.base_url + "/v1", reader, model="tiny"))
    request: dict[str, Any] = dict(
        model="tiny", messages=MESSAGES, max_tokens=60, temperature=0, extra_body={"max_reasoning_tokens": 30}
    )
    with openai.OpenAI(base_url=proxy.base_url + "/v1", api_key="none", max_retries=0) as client:
        chunks = list(client.chat.completions.create(stream=True, **request))
    via_proxy = (chunks[-1].model_extra or {})["cotmon"]

    with openai.OpenAI(base_url=upstream.base_url + "/v1", api_key="none", max_retries=0) as direct:
        text = direct.chat.completions.create(**request).choices[0].message
    reasoning = (text.model_extra or {})["reasoning"]
    transcript = reasoning + "</think>" + (text.content or "")

    in_process = Pipeline(
        HFEngine.load("tiny"),
        [DetectorSpec("linear_probe", "p", {"artifact": str(make_probe())})],
        parse_policy({"name": "test", "rules": RULES}, "test.yaml"),
        metrics=metrics,
    )
    local = asyncio.run(in_process.teacher_force([ChatMessage("user", MESSAGES[0]["content"])], transcript).run())
    assert [(f["rule"], f["index"]) for f in via_proxy["flags"]] == [(f.rule, f.index) for f in local.flags]
    assert via_proxy["flags"]  # the comparison is about something
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text.content


def test_a_halt_closes_the_upstream_stream(serve: Serve) -> None:
    upstream = serve(use_engine=HFEngine.load("tiny"))
    proxy = serve(
        rules=[HALT_AT_FIFTH], use_engine=UpstreamEngine(upstream.base_url + "/v1", HFEngine.load("tiny"), model="tiny")
    )
    with openai.OpenAI(base_url=proxy.base_url + "/v1", api_key="none", max_retries=0) as client:
        chunks = list(
            client.chat.completions.create(
                model="tiny", messages=MESSAGES, max_tokens=2000, stream=True, extra_body={"ignore_eos": True}
            )
        )
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    value = upstream.metrics.registry.get_sample_value
    for _ in range(100):
        if value("cotmon_sessions_total", {"outcome": "aborted"}):
            break
        asyncio.run(asyncio.sleep(0.01))
    assert value("cotmon_sessions_total", {"outcome": "aborted"}) == 1
    assert value("cotmon_tokens_total", {"channel": "reasoning"}) < 2000


def test_an_upstream_error_is_a_502_with_its_message(serve: Serve) -> None:
    dead = UpstreamEngine("http://127.0.0.1:9/v1", HFEngine.load("tiny"), model="tiny")
    proxy = serve(use_engine=dead)
    reply = httpx.post(proxy.base_url + "/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "max_tokens": 4})
    assert reply.status_code == 502 and reply.json()["error"]["type"] == "upstream_error"
