"""Property-based fuzzing of a running server from its own OpenAPI schema, with schemathesis.

Every operation in `/openapi.json` gets schema-valid (positive) and schema-violating (negative)
requests. Whatever is sent, the server must never answer 5xx, and every 4xx must carry an
OpenAI-style error body. Responses are not modelled in the schema, so their bodies are not
checked against it. Generation is bounded: the server refuses max_tokens over 8, so a valid chat
request generates at most 8 tokens of the tiny model.
"""

from __future__ import annotations

import json
from collections import Counter

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from conftest import Serve

MAX_TOKENS = 8
# Examples per (operation, mode); hypothesis stops earlier when an operation has fewer distinct inputs.
EXAMPLES = {"POST": 150, "GET": 10}
MIN_REQUESTS = 500
# Operations whose only input is a free-form string path parameter: no request can violate their schema.
NOTHING_TO_BREAK = {"GET /v1/sessions/{session_id}"}


def _check(case: schemathesis.Case, response: schemathesis.Response) -> None:
    where = f"\n{case.as_curl_command()}\n-> {response.status_code} {response.text[:500]!r}"
    assert response.status_code < 500, "server error" + where
    case.validate_response(response, checks=[not_a_server_error])
    if 400 <= response.status_code < 500:
        try:
            body = response.json()
        except ValueError:
            body = None
        error = body.get("error") if isinstance(body, dict) else None
        assert isinstance(error, dict), "4xx without an OpenAI-style error body" + where
        assert isinstance(error.get("message"), str) and isinstance(error.get("type"), str), "malformed error body" + where
    elif response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        # At most 8 tokens: far fewer events than schemathesis reads of a stream before it stops.
        assert not response.stream_cut_short and response.text.endswith("data: [DONE]\n\n"), "stream did not finish" + where
        events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
        # Once the headers are out a failure can only be an error event: the streamed form of a 5xx.
        assert not any("error" in event for event in events), "error event in a stream" + where


def _fuzz(
    operation: schemathesis.APIOperation, mode: GenerationMode, base_url: str, session: requests.Session, sent: Counter[str]
) -> None:
    """Sends hypothesis-generated cases of one operation in one generation mode, checking every response."""
    strategy = operation.as_strategy(generation_mode=mode)

    @settings(
        max_examples=EXAMPLES[operation.method.upper()],
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        case = data.draw(strategy)
        # Valid bodies rarely name the served model (404) or carry a transcript (400): steer most of them to the
        # model, streamed or not, so that generation and teacher forcing get fuzzed too.
        if mode is GenerationMode.POSITIVE and isinstance(case.body, dict) and data.draw(st.integers(0, 3), label="steer") < 3:
            case.body["model"] = "tiny"
            if operation.path == "/v1/chat/completions":
                case.body["stream"] = data.draw(st.booleans(), label="stream")
            elif case.body.get("completion") is None and case.body.get("reasoning") is None:
                case.body["completion"] = data.draw(st.text(min_size=1, max_size=100), label="completion")
        response = case.call(base_url=base_url, session=session, timeout=60)
        sent[operation.label] += 1
        _check(case, response)

    fuzz()


def test_fuzzing_the_openapi_schema_never_yields_a_server_error(serve: Serve) -> None:
    server = serve(max_tokens_limit=MAX_TOKENS)
    # An explicit config (no schemathesis.toml discovery); unsanitised, as `max_tokens` would show as "[Filtered]".
    config = schemathesis.Config.from_dict({"output": {"sanitization": {"enabled": False}}})
    schema = schemathesis.openapi.from_url(server.base_url + "/openapi.json", config=config, timeout=10)
    sent: Counter[str] = Counter()
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            # Negative cases need something to break: a body or a parameter (the GET routes have neither).
            negative = (bool(operation.body) or any(True for _ in operation.iter_parameters())) and (
                operation.label not in NOTHING_TO_BREAK
            )
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if negative else (GenerationMode.POSITIVE,):
                _fuzz(operation, mode, server.base_url, session, sent)
    assert set(sent) == {
        "GET /healthz",
        "GET /readyz",
        "GET /metrics",
        "GET /v1/models",
        "POST /v1/chat/completions",
        "POST /v1/monitor/transcripts",
        "GET /v1/sessions",
        "GET /v1/sessions/{session_id}",
        "POST /v1/sessions/{session_id}/replay",
    }, sent
    assert sum(sent.values()) >= MIN_REQUESTS, sent
