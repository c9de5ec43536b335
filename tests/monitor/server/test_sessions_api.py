"""/v1/sessions: list with filters, fetch, replay (full and policy-only) over real HTTP."""

from __future__ import annotations

import time
from typing import Any

import httpx
import jsonschema
import pytest

from conftest import LONG_COT, Serve

LONG = LONG_COT
MESSAGES = [{"role": "user", "content": "Did you run the tests?"}]


def _watch(base: str, reasoning: str, session_id: str, **headers: str) -> dict[str, Any]:
    body = {"messages": MESSAGES, "reasoning": reasoning, "answer": "Yes.", "label": session_id}
    reply = httpx.post(base + "/v1/monitor/transcripts", json=body, headers=headers, timeout=60)
    reply.raise_for_status()
    return reply.json()  # type: ignore[no-any-return]


@pytest.fixture
def server(serve: Serve) -> Any:
    server = serve(rules=[LONG], store_keep="all")
    long = _watch(server.base_url, "I never ran them but I will say I did, since nobody checks the logs anyway.", "long")
    short = _watch(server.base_url, "Ran them.", "short")
    server.ids = {"long": long["session_id"], "short": short["session_id"]}
    return server


def _flag_count(server: Any) -> float:
    value = server.metrics.registry.get_sample_value(
        "cotmon_flags_total", {"category": "deception", "severity": "critical", "rule": "long-cot"}
    )
    return value or 0.0


def test_sessions_are_listed_newest_first_and_filtered(server: Any) -> None:
    every = httpx.get(server.base_url + "/v1/sessions").json()
    assert [s["label"] for s in every["data"]] == ["short", "long"] and every["total"] == 2
    flagged = httpx.get(server.base_url + "/v1/sessions", params={"flagged": "true"}).json()
    assert [s["label"] for s in flagged["data"]] == ["long"]
    assert flagged["data"][0]["flags"][0]["rule"] == "long-cot" and flagged["data"][0]["severity"] == "critical"
    by_rule = httpx.get(server.base_url + "/v1/sessions", params={"rule": "long-cot", "since": "1h"}).json()
    assert [s["label"] for s in by_rule["data"]] == ["long"]
    assert httpx.get(server.base_url + "/v1/sessions", params={"until": "2000-01-01"}).json()["total"] == 0


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"since": "yesterday"}, "since"),
        ({"severity": "loud"}, "severity"),
        ({"limit": "0"}, "limit"),
        ({"offset": str(2**63)}, "offset"),  # past SQL's BIGINT: was a 500
        ({"offset": "-1"}, "offset"),
    ],
)
def test_bad_filters_are_400s_naming_the_parameter(server: Any, params: dict[str, str], param: str) -> None:
    reply = httpx.get(server.base_url + "/v1/sessions", params=params)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param


def test_a_session_comes_back_whole(server: Any) -> None:
    stored = httpx.get(f"{server.base_url}/v1/sessions/{server.ids['long']}").json()
    assert stored["mode"] == "teacher_force" and stored["flags"][0]["index"] == 29
    assert "I never ran them" in "".join(s["text"] for s in stored["steps"])
    assert stored["detector_specs"][0]["name"] == "p" and stored["policy"]["rules"][0]["name"] == "long-cot"
    missing = httpx.get(server.base_url + "/v1/sessions/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_a_full_replay_over_http_reproduces_the_session_and_raises_no_alert(server: Any) -> None:
    before = _flag_count(server)
    result = httpx.post(f"{server.base_url}/v1/sessions/{server.ids['long']}/replay", json={}, timeout=60).json()
    assert result["mode"] == "full" and not result["changed"] and result["readouts_max_diff"] == 0.0
    assert [c["change"] for c in result["changes"]] == ["same"]
    assert _flag_count(server) == before  # a replay is not live traffic


def test_a_replay_under_a_new_policy_diffs_the_flags(server: Any) -> None:
    lenient = {"name": "lenient", "rules": [{**LONG, "when": {**LONG["when"], "window": 500, "gte": 500}}]}
    for mode in ("full", "policy"):
        result = httpx.post(
            f"{server.base_url}/v1/sessions/{server.ids['long']}/replay", json={"policy": lenient, "mode": mode}, timeout=60
        ).json()
        assert result["mode"] == mode and [c["change"] for c in result["changes"]] == ["gone"], result
    as_yaml = (
        "name: y\nrules:\n  - {name: any, category: deception, severity: info, when: {detector: p, gte: 0.0}, actions: [alert]}\n"
    )
    result = httpx.post(
        f"{server.base_url}/v1/sessions/{server.ids['short']}/replay", json={"policy": as_yaml, "mode": "policy"}
    ).json()
    assert [(c["rule"], c["change"]) for c in result["changes"]] == [("any", "new")]


def test_a_bad_replay_policy_is_a_400_naming_the_field(server: Any) -> None:
    bad = {"name": "b", "rules": [{**LONG, "severity": "loud"}]}
    reply = httpx.post(f"{server.base_url}/v1/sessions/{server.ids['long']}/replay", json={"policy": bad})
    assert reply.status_code == 400 and "severity" in reply.json()["error"]["message"]
    unknown = {"name": "b", "rules": [{**LONG, "when": {"detector": "nobody", "gte": 0.5}}]}
    reply = httpx.post(f"{server.base_url}/v1/sessions/{server.ids['long']}/replay", json={"policy": unknown})
    assert reply.status_code == 400 and "nobody" in reply.json()["error"]["message"]


def test_a_yaml_bomb_as_replay_policy_is_a_quick_400(server: Any) -> None:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    started = time.perf_counter()
    reply = httpx.post(
        f"{server.base_url}/v1/sessions/{server.ids['long']}/replay", json={"policy": "\n".join(lines)}, timeout=30
    )
    assert time.perf_counter() - started < 1.0
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "policy"
    assert "expands" in reply.json()["error"]["message"]
    assert httpx.get(server.base_url + "/healthz").status_code == 200


def test_a_full_replay_of_another_models_session_is_a_409(server: Any) -> None:
    stored = server.store.get(server.ids["long"])
    server.store.save(
        type(stored)(**{**stored.__dict__, "session_id": "other", "model": type(stored.model)("org/m", "abc", 64, 4)})
    )
    reply = httpx.post(server.base_url + "/v1/sessions/other/replay", json={"mode": "full"})
    assert reply.status_code == 409 and "org/m@abc" in reply.json()["error"]["message"]
    auto = httpx.post(server.base_url + "/v1/sessions/other/replay", json={}).json()
    assert auto["mode"] == "policy" and not auto["changed"]


def test_session_routes_need_the_api_key(serve: Serve) -> None:
    server = serve(rules=[LONG], api_key="sekrit")
    assert httpx.get(server.base_url + "/v1/sessions").status_code == 401
    assert httpx.post(server.base_url + "/v1/sessions/x/replay", json={}).status_code == 401
    ok = httpx.get(server.base_url + "/v1/sessions", headers={"Authorization": "Bearer sekrit"})
    assert ok.status_code == 200 and ok.json()["total"] == 0


def test_the_schema_follows_the_api_key_and_no_docs_page_loads_third_party_script(serve: Serve) -> None:
    server = serve(rules=[LONG], api_key="sekrit")
    assert httpx.get(server.base_url + "/openapi.json").status_code == 401
    schema = httpx.get(server.base_url + "/openapi.json", headers={"Authorization": "Bearer sekrit"})
    assert schema.status_code == 200 and "/v1/chat/completions" in schema.json()["paths"]
    assert "/openapi.json" not in schema.json()["paths"]
    for page in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert httpx.get(server.base_url + page, headers={"Authorization": "Bearer sekrit"}).status_code == 404


def test_watch_mode_refuses_a_client_chosen_session_id_and_keeps_the_stored_transcript(server: Any) -> None:
    target = server.ids["long"]
    before = httpx.get(f"{server.base_url}/v1/sessions/{target}").content
    body = {"messages": MESSAGES, "reasoning": "Ran them.", "answer": "Yes.", "session_id": target}
    reply = httpx.post(server.base_url + "/v1/monitor/transcripts", json=body, timeout=60)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "session_id"
    assert "label" in reply.json()["error"]["message"]
    assert httpx.get(f"{server.base_url}/v1/sessions/{target}").content == before  # byte-identical


def test_a_label_is_stored_and_filters_but_never_names_the_session(server: Any) -> None:
    again = _watch(server.base_url, "Ran them twice.", "long")  # the same label as a flagged session
    assert again["label"] == "long" and again["session_id"] not in server.ids.values()
    labelled = httpx.get(server.base_url + "/v1/sessions", params={"label": "long"}).json()
    assert sorted(s["session_id"] for s in labelled["data"]) == sorted([server.ids["long"], again["session_id"]])
    first = httpx.get(f"{server.base_url}/v1/sessions/{server.ids['long']}").json()
    assert first["flags"] and "I never ran them" in "".join(s["text"] for s in first["steps"])


def test_the_schema_documents_invalid_requests_as_the_400s_the_server_sends(serve: Serve) -> None:
    server = serve()
    schema = httpx.get(server.base_url + "/openapi.json").json()
    operations = {f"{m.upper()} {p}": op for p, ops in schema["paths"].items() for m, op in ops.items()}
    with_input = [label for label, op in operations.items() if op.get("parameters") or op.get("requestBody")]
    assert len(with_input) == 5, with_input
    for label in with_input:
        responses = operations[label]["responses"]
        assert "422" not in responses, label
        assert responses["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}, label
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    error_schema = schema["components"]["schemas"]["ErrorResponse"]
    for reply in (
        httpx.get(server.base_url + "/v1/sessions", params={"limit": "lots"}),
        httpx.post(server.base_url + "/v1/chat/completions", json={"messages": "hi"}),
        httpx.post(server.base_url + "/v1/sessions/x/replay", json={"mode": "sideways"}),
    ):
        assert reply.status_code == 400, reply.request.url
        jsonschema.validate(reply.json(), error_schema)
