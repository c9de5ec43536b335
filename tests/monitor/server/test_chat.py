"""The OpenAI-compatible API, driven by the official `openai` client against a real server."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import httpx
import openai
import pytest

from conftest import HALT_AT_FIFTH, Serve
from monitor.server.routes import SESSION_HEADER
from monitor.testing import ScriptedEngine
from monitor.types import TraceStep
from probes.datasets import load_examples

MESSAGES: list[Any] = [{"role": "user", "content": "Did the deployment succeed?"}]


_clients: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Close each test's clients: one left to the garbage collector may have its socket collected
    before the client closes it, a ResourceWarning in whatever test runs then."""
    yield
    while _clients:
        _clients.pop().close()


def _client(server: Any, key: str = "none") -> openai.OpenAI:
    _clients.append(openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0))
    return _clients[-1]


def test_non_streaming_chat_returns_reasoning_answer_and_the_cotmon_object(serve: Serve) -> None:
    server = serve()
    raw = _client(server).chat.completions.with_raw_response.create(
        model="tiny", messages=MESSAGES, max_tokens=30, temperature=0, extra_body={"max_reasoning_tokens": 10}
    )
    response = raw.parse()
    message = response.choices[0].message
    extra = message.model_extra or {}
    assert extra["reasoning"] and extra["reasoning"] == extra["reasoning_content"]
    assert "</think>" not in extra["reasoning"] and message.content
    assert response.choices[0].finish_reason == "length"
    cotmon = (response.model_extra or {})["cotmon"]
    assert cotmon["session_id"] == raw.headers[SESSION_HEADER] and cotmon["flags"] == [] and cotmon["outcome"] == "completed"
    assert response.usage is not None and response.usage.completion_tokens == 30


def test_streaming_chat_streams_reasoning_then_content_and_ends_with_the_cotmon_object(serve: Serve) -> None:
    server = serve()
    with _client(server).chat.completions.with_streaming_response.create(
        model="tiny", messages=MESSAGES, max_tokens=30, temperature=0, stream=True, extra_body={"max_reasoning_tokens": 10}
    ) as raw:
        session = raw.headers[SESSION_HEADER]
        chunks = list(raw.parse())
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join((d.model_extra or {}).get("reasoning", "") for d in deltas)
    mirrored = "".join((d.model_extra or {}).get("reasoning_content", "") for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert reasoning and reasoning == mirrored and content and "</think>" not in reasoning + content
    first_content = next(i for i, d in enumerate(deltas) if d.content)
    assert all(not (d.model_extra or {}).get("reasoning") for d in deltas[first_content:])
    last = chunks[-1]
    assert last.choices[0].finish_reason == "length"
    assert (last.model_extra or {})["cotmon"]["session_id"] == session


def test_streamed_and_non_streamed_text_agree(serve: Serve) -> None:
    server = serve()
    args: dict[str, Any] = dict(
        model="tiny", messages=MESSAGES, max_tokens=24, temperature=0, extra_body={"max_reasoning_tokens": 8}
    )
    whole = _client(server).chat.completions.create(**args).choices[0].message
    streamed = list(_client(server).chat.completions.create(stream=True, **args))
    content = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert content == whole.content


def test_a_halt_ends_the_stream_with_content_filter(serve: Serve) -> None:
    server = serve(rules=[HALT_AT_FIFTH])
    chunks = list(
        _client(server).chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=50, stream=True, extra_body={"ignore_eos": True}
        )
    )
    last = chunks[-1]
    assert last.choices[0].finish_reason == "content_filter"
    cotmon = (last.model_extra or {})["cotmon"]
    assert cotmon["outcome"] == "halted" and [f["rule"] for f in cotmon["flags"]] == ["halt-fifth"]
    assert cotmon["flags"][0]["index"] == 4
    stored = server.store.get(cotmon["session_id"])
    assert stored is not None and (stored.outcome, len(stored.steps)) == ("halted", 5)


def test_non_streaming_halt_reports_content_filter(serve: Serve) -> None:
    server = serve(rules=[HALT_AT_FIFTH])
    response = _client(server).chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=50, extra_body={"ignore_eos": True}
    )
    assert response.choices[0].finish_reason == "content_filter"
    assert response.usage is not None and response.usage.completion_tokens == 5


def test_watch_mode_scores_a_deceptive_example_like_the_in_process_pipeline(serve: Serve) -> None:
    rule = {
        **HALT_AT_FIFTH,
        "name": "sustained",
        "actions": ["alert", "store"],
        "when": {"detector": "p", "stat": "max", "window": 64, "gte": 0.5},
    }
    server = serve(rules=[rule])
    example = next(e for e in load_examples() if e.label == "deceptive")
    messages = [m.to_dict() for m in example.messages]
    reply = httpx.post(
        server.base_url + "/v1/monitor/transcripts",
        json={"model": "tiny", "messages": messages, "reasoning": example.reasoning, "answer": example.answer},
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    local = asyncio.run(server.pipeline.teacher_force(example.messages, example.assistant_text(True), session_id="local").run())
    assert body["flags"] == [f.to_dict() for f in local.flags] and body["flags"]
    assert body["tokens"] == len(local.steps) and reply.headers[SESSION_HEADER] == body["session_id"]
    assert [d["score"] for d in body["detections"]] == pytest.approx([d.score for d in local.detections], abs=1e-5)


def test_models_lists_the_served_model(serve: Serve) -> None:
    assert [m.id for m in _client(serve()).models.list()] == ["tiny"]


def test_unknown_model_is_a_404_with_an_openai_error_body(serve: Serve) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        _client(serve()).chat.completions.create(model="gpt-9", messages=MESSAGES)
    assert err.value.body["code"] == "model_not_found"  # type: ignore[index]


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"model": "tiny", "messages": []}, "messages"),
        ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": "tiny", "messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"model": "tiny", "messages": MESSAGES, "max_tokens": 10**6}, "max_tokens"),
        ({"model": "tiny", "messages": MESSAGES, "temperature": 9}, "temperature"),
        ({"messages": MESSAGES}, "model"),
    ],
)
def test_bad_requests_get_a_400_naming_the_parameter(serve: Serve, payload: dict[str, Any], param: str) -> None:
    reply = httpx.post(serve().base_url + "/v1/chat/completions", json=payload)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


# Messages OpenAI's API refuses, and the field it names.
MALFORMED_MESSAGES: list[tuple[list[Any], str]] = [
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": None}], "messages[1].content"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant"}, {"role": "user", "content": "Well?"}], "messages[1].content"),
    (
        [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "video", "url": "x"}]}],
        "messages[0].content[1].type",
    ),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}], "messages[0].content[0].type"),
    ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text"),
    ([{"role": "user", "content": 42}], "messages[0].content"),
    ([{"content": "Hi"}], "messages[0].role"),
    ([], "messages"),
]


@pytest.mark.parametrize(("messages", "param"), MALFORMED_MESSAGES)
def test_malformed_messages_are_a_400_naming_the_field_for_the_openai_client(
    serve: Serve, messages: list[Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        _client(serve()).chat.completions.create(model="tiny", messages=messages, max_tokens=3)
    assert err.value.body["param"] == param and err.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    assert err.value.body["message"].startswith(param)  # type: ignore[index]


@pytest.mark.parametrize(("messages", "param"), MALFORMED_MESSAGES)
def test_malformed_messages_are_a_400_naming_the_field_in_watch_mode(serve: Serve, messages: list[Any], param: str) -> None:
    body = {"model": "tiny", "messages": messages, "reasoning": "Let me check.", "answer": "Done."}
    reply = httpx.post(serve().base_url + "/v1/monitor/transcripts", json=body)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text


LONE_SURROGATES: list[tuple[str, dict[str, Any], str]] = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi \ud800"}]}, "messages[0].content"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "ok"}, {"type": "text", "text": "\udfff"}]}]},
        "messages[0].content[1].text",
    ),
    ("/v1/monitor/transcripts", {"messages": [{"role": "user", "content": "\ud800"}], "completion": "x"}, "messages[0].content"),
    ("/v1/monitor/transcripts", {"messages": [{"role": "user", "content": "Hi"}], "reasoning": "a \udc00"}, "reasoning"),
    ("/v1/monitor/transcripts", {"messages": [{"role": "user", "content": "Hi"}], "completion": "\ud83d"}, "completion"),
]


@pytest.mark.parametrize(("path", "payload", "param"), LONE_SURROGATES)
def test_a_lone_surrogate_is_a_400_naming_the_field_not_a_500(
    serve: Serve, path: str, payload: dict[str, Any], param: str
) -> None:
    # JSON may escape half of a surrogate pair ("\ud800"); such a string cannot be encoded anywhere downstream.
    body = json.dumps({"model": "tiny", **payload} | ({"max_tokens": 3} if path.endswith("completions") else {}))
    assert "\\ud" in body or "\\udc" in body or "\\udf" in body
    reply = httpx.post(serve().base_url + path, content=body, headers={"content-type": "application/json"})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text
    assert "surrogate" in reply.json()["error"]["message"]


def test_an_assistant_message_with_tool_calls_and_no_content_is_accepted(serve: Serve) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "Look it up."},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    ]
    reply = _client(serve()).chat.completions.create(model="tiny", messages=messages, max_tokens=3)  # type: ignore[arg-type]
    assert reply.choices[0].finish_reason in {"stop", "length"}


def test_malformed_json_is_a_400(serve: Serve) -> None:
    reply = httpx.post(
        serve().base_url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert reply.status_code == 400 and "error" in reply.json()


def test_oversized_body_is_a_413(serve: Serve) -> None:
    server = serve(max_request_bytes=2048)
    big = [{"role": "user", "content": "x" * 5000}]
    reply = httpx.post(server.base_url + "/v1/chat/completions", json={"model": "tiny", "messages": big})
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large"


def test_an_oversized_chunked_body_without_content_length_is_a_413_too(serve: Serve) -> None:
    server = serve(max_request_bytes=2048)
    pieces = [b'{"model": "tiny", "messages": [{"role": "user", "content": "', *[b"x" * 1000] * 5, b'"}]}']
    for path in ("/v1/chat/completions", "/v1/monitor/transcripts"):
        reply = httpx.post(server.base_url + path, content=iter(pieces), headers={"content-type": "application/json"})
        assert "content-length" not in reply.request.headers and reply.request.headers["transfer-encoding"] == "chunked"
        assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large", path


def test_api_key_guards_every_route_but_health_and_metrics(serve: Serve) -> None:
    server = serve(api_key="s3cret")
    url = server.base_url
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert httpx.post(url + "/v1/monitor/transcripts", json={}).status_code == 401
    for open_route in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(url + open_route).status_code == 200, open_route
    with pytest.raises(openai.AuthenticationError):
        _client(server, key="wrong").models.list()
    assert _client(server, key="s3cret").models.list().data[0].id == "tiny"


def test_metrics_endpoint_exposes_the_session_counters(serve: Serve) -> None:
    server = serve()
    _client(server).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5)
    text = httpx.get(server.base_url + "/metrics").text
    assert 'cotmon_sessions_total{outcome="completed"} 1.0' in text and "cotmon_tokens_total" in text


def test_a_client_that_disconnects_stops_generation_and_is_recorded_as_aborted(serve: Serve) -> None:
    server = serve()
    payload = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=payload) as reply:
        lines = reply.iter_lines()
        for _ in range(6):
            next(lines)
    closed = time.monotonic()
    aborted = None
    while time.monotonic() - closed < 1.0:
        aborted = server.metrics.registry.get_sample_value("cotmon_sessions_total", {"outcome": "aborted"})
        if aborted:
            break
        time.sleep(0.01)
    assert aborted == 1
    tokens = server.metrics.registry.get_sample_value("cotmon_tokens_total", {"channel": "reasoning"})
    time.sleep(0.2)
    assert server.metrics.registry.get_sample_value("cotmon_tokens_total", {"channel": "reasoning"}) == tokens < 4000


def test_sse_lines_are_data_events_ending_in_done(serve: Serve) -> None:
    payload = {"model": "tiny", "messages": MESSAGES, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", serve().base_url + "/v1/chat/completions", json=payload) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = [line for line in reply.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"


class ExplodingEngine(ScriptedEngine):
    """Fails on its first token with an error nobody planned for."""

    async def _play(self, session_id: str) -> AsyncGenerator[TraceStep, None]:
        raise ZeroDivisionError("boom")
        yield  # an async generator


def test_an_unexpected_failure_is_a_500_body_and_the_connection_stays_usable(serve: Serve) -> None:
    server = serve(use_engine=ExplodingEngine([("x", "answer")]))
    with httpx.Client(base_url=server.base_url) as client:
        reply = client.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES})
        assert reply.status_code == 500 and reply.json()["error"]["type"] == "server_error"
        assert client.get("/healthz").status_code == 200
        with client.stream("POST", "/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "stream": True}) as s:
            events = [line for line in s.iter_lines() if line]
        assert '"server_error"' in events[-2] and events[-1] == "data: [DONE]"
