"""The HTTP routes: chat completions (SSE and not), watch mode, models, health and metrics.

`open_routes` need no key (probes and Prometheus call them); `create_app` puts `api` behind the key.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, aclosing
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from monitor.engine.text import compose_assistant_text
from monitor.observability import get_logger
from monitor.server.limits import TokenLimits, unless_disconnected
from monitor.server.openapi import api_schema
from monitor.server.protocol import (
    APIError,
    ChatCompletionRequest,
    MonitorTranscriptRequest,
    chat_messages,
    chunk,
    completion,
    cotmon_object,
    error_body,
    finish_reason,
    flags_json,
    usage,
    whole_text,
)
from monitor.server.state import ServerState, server_state
from monitor.server.stream import DeltaSplitter, split_steps
from monitor.session import Session
from monitor.summary import mean_scores
from monitor.types import GenerationRequest, max_scores

DEFAULT_MAX_TOKENS = 512
SESSION_HEADER = "X-Cotmon-Session"

open_routes = APIRouter()
api = APIRouter()


@open_routes.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@open_routes.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """The model is loaded, the data directory is writable and the transcript store answers.

    With the spool in front of the store, a store that fails leaves the server ready (kept sessions
    wait on local disk): the answer says `"store": "degraded"` and how many wait; without it, 503.
    """
    # Open to anyone (no key, no Host check): the reasons name no path or database; the log has the detail.
    s = server_state(request)
    try:
        s.settings.data_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=s.settings.data_dir):
            pass
    except OSError as exc:
        get_logger("cotmon.server").error("not_ready", reason="data dir not writable", error=str(exc))
        return JSONResponse({"status": "not ready", "reason": "data directory not writable"}, status_code=503)
    body: dict[str, Any] = {"status": "ready", "model": s.model_name}
    if s.store is not None:
        try:
            await s.read_store(s.store.ping, path=request.url.path)
            body["store"] = "ok"
        except APIError:
            if s.spool is None:
                return JSONResponse({"status": "not ready", "reason": "transcript store unavailable"}, status_code=503)
            body["store"] = "degraded"
    if s.spool is not None:
        body["spooled"] = s.spool.waiting()
        if s.spool.last_error is not None:
            body["store"] = "degraded"
    return JSONResponse(body)


@open_routes.get("/metrics")
async def metrics(request: Request) -> Response:
    return PlainTextResponse(generate_latest(server_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@api.get("/openapi.json", include_in_schema=False)
async def openapi_schema(request: Request) -> JSONResponse:
    """The OpenAPI schema of this API (for clients and fuzzers); needs the API key when one is set."""
    return JSONResponse(api_schema(request.app))


@api.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    s = server_state(request)
    return {"object": "list", "data": [{"id": s.model_name, "object": "model", "created": 0, "owned_by": "cotmon"}]}


def _check_model(s: ServerState, model: str | None) -> None:
    if model is not None and model != s.model_name:
        raise APIError(404, f"model {model!r} does not exist (served: {s.model_name!r})", param="model", code="model_not_found")


@api.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    s = server_state(request)
    _check_model(s, body.model)
    limit = s.settings.max_tokens_limit
    max_tokens = body.max_completion_tokens or body.max_tokens or min(DEFAULT_MAX_TOKENS, limit)
    if max_tokens > limit:
        raise APIError(400, f"max_tokens {max_tokens} exceeds this server's limit of {limit}", param="max_tokens")
    messages = chat_messages(body.messages)
    gen = GenerationRequest(
        messages=messages,
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        max_reasoning_tokens=body.max_reasoning_tokens,
        ignore_eos=body.ignore_eos,
        session_id=uuid.uuid4().hex,
    )
    prompt_tokens = await TokenLimits.of(s.settings, s.pipeline.engine).prompt(messages)
    async with AsyncExitStack() as slot:
        await slot.enter_async_context(s.admission.slot())
        session = s.pipeline.generate(gen)
        headers = {SESSION_HEADER: session.session_id}
        completion_id = f"chatcmpl-{session.session_id}"
        if body.stream:  # the stream holds the slot until it ends
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = _sse(s, session, slot.pop_all(), completion_id, max_tokens, prompt_tokens, include_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        transcript = await unless_disconnected(request, session.run())
    await _stored(s, transcript.session_id)
    text = split_steps(transcript.steps)
    return JSONResponse(completion(completion_id, s.model_name, transcript, text, max_tokens, prompt_tokens), headers=headers)


async def _stored(s: ServerState, session_id: str) -> None:
    """Read-your-writes: a response ends once the store has its session, unless the store is slow or
    down (then the session waits in the spool and the response does not)."""
    if s.spool is not None:
        wait = asyncio.get_running_loop().run_in_executor
        await wait(s.store_threads, s.spool.wait_stored, session_id, min(s.settings.store_timeout, 2.0))


def _data(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _sse(
    s: ServerState,
    session: Session,
    slot: AsyncExitStack,
    completion_id: str,
    max_tokens: int,
    prompt_tokens: int,
    include_usage: bool,
) -> AsyncIterator[str]:
    """SSE chunks: role, then reasoning/content deltas, then a final chunk with the `cotmon` object;
    `slot` (the admission slot) is released when the stream ends."""
    created = int(time.time())
    splitter = DeltaSplitter()
    try:  # headers are sent already: a failure becomes an error event, never a dropped stream
        yield _data(chunk(completion_id, s.model_name, created, {"role": "assistant", "content": ""}))
        async with aclosing(session.events()) as events:
            async for event in events:
                reasoning, content = splitter.push(event.step.text, event.step.channel)
                if reasoning or content:
                    yield _data(chunk(completion_id, s.model_name, created, _delta(reasoning, content)))
        rest = splitter.flush()
        if rest:
            yield _data(chunk(completion_id, s.model_name, created, _delta(rest, "")))
        transcript = session.transcript
        assert transcript is not None
        await _stored(s, transcript.session_id)
        final = chunk(
            completion_id, s.model_name, created, {}, finish_reason(transcript, max_tokens), cotmon=cotmon_object(transcript)
        )
        yield _data(final)
        if include_usage:
            yield _data(
                {**chunk(completion_id, s.model_name, created, {}), "choices": [], "usage": usage(prompt_tokens, transcript)}
            )
        yield "data: [DONE]\n\n"
    except Exception as exc:
        yield _data(error_body(f"generation failed: {exc}", type="server_error"))
        yield "data: [DONE]\n\n"
    finally:
        await slot.aclose()


def _delta(reasoning: str, content: str) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if reasoning:
        delta["reasoning"] = delta["reasoning_content"] = reasoning
    if content:
        delta["content"] = content
    return delta


@api.post("/v1/monitor/transcripts")
async def monitor_transcript(body: MonitorTranscriptRequest, request: Request) -> JSONResponse:
    """Watch mode: teacher-force a transcript produced elsewhere and return detections and flags."""
    s = server_state(request)
    _check_model(s, body.model)
    messages = chat_messages(body.messages)
    for field in ("completion", "reasoning", "answer"):
        if (value := getattr(body, field)) is not None:
            whole_text(value, field)
    if body.completion is not None:
        text = body.completion
    elif body.reasoning is not None:
        text = compose_assistant_text(body.reasoning, body.answer or "", s.pipeline.engine.prompt_opens_reasoning(messages))
    else:
        raise APIError(400, "give either 'completion' or 'reasoning' (with an optional 'answer')", param="completion")
    if not text.strip():
        raise APIError(400, "the transcript is empty", param="completion")
    if body.session_id is not None:  # a chosen id could name (and so replace) another session's evidence
        raise APIError(400, "session ids are assigned by the server; pass your own id as 'label'", param="session_id")
    limits = TokenLimits.of(s.settings, s.pipeline.engine)
    given = "completion" if body.completion is not None else "reasoning"
    await limits.transcript(text, await limits.prompt(messages), given)
    async with s.admission.slot():
        session = s.pipeline.teacher_force(messages, text, label=body.label)
        transcript = await unless_disconnected(request, session.run())
    await _stored(s, transcript.session_id)
    return JSONResponse(
        {
            "session_id": transcript.session_id,
            "label": body.label,
            "outcome": transcript.outcome,
            "tokens": len(transcript.steps),
            "flags": flags_json(transcript.flags),
            "max_scores": max_scores(transcript.detections),
            "reasoning_mean_scores": mean_scores(transcript, "reasoning"),
            "detections": [
                {"detector": d.detector, "category": d.category, "score": round(d.score, 6), "start": d.start, "end": d.end}
                for d in transcript.detections
            ],
        },
        headers={SESSION_HEADER: transcript.session_id},
    )
