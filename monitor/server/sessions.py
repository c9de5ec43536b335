"""Stored sessions over HTTP: list, fetch, replay (`/v1/sessions...`); the viewer uses the same calls.

`create_app` puts `router` behind the API key.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from monitor.policy import Policy, PolicyError, parse_policy, read_policy_yaml
from monitor.replay import ReplayResult, replay_full, replay_policy, stored_policy
from monitor.server.protocol import APIError
from monitor.server.state import ServerState, server_state
from monitor.store import QueryError, SessionQuery, TranscriptStore, parse_query, transcript_to_dict
from monitor.types import Transcript

ReplayMode = Literal["auto", "full", "policy"]


class ReplayRequest(BaseModel):
    """POST /v1/sessions/{id}/replay."""

    model_config = ConfigDict(extra="forbid")
    policy: dict[str, Any] | str | None = Field(
        None, description="A policy (as an object, or YAML text) to replay under; the stored one when absent."
    )
    mode: ReplayMode = Field(
        "auto",
        description="full: teacher-force the stored tokens through this server's model and detectors; policy: the policy "
        "over the stored detections (no model); auto: full when this server runs the session's model and detectors.",
    )


def store_of(s: ServerState) -> TranscriptStore:
    if s.store is None:
        raise APIError(404, "this server keeps no transcript store", code="not_found")
    return s.store


def session_query(
    flagged: bool | None = None,
    category: str | None = None,
    rule: str | None = None,
    severity: str | None = None,
    outcome: str | None = None,
    label: str | None = None,
    since: str | None = None,
    until: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> SessionQuery:
    """Query parameters -> SessionQuery; a bad value is a 400 naming the parameter."""
    if not 1 <= limit <= 1000:
        raise APIError(400, "limit must be between 1 and 1000", param="limit")
    filters = {"category": category, "rule": rule, "severity": severity, "outcome": outcome, "since": since, "until": until}
    filters |= {"label": label}
    try:
        return parse_query(flagged=flagged, limit=limit, offset=offset, **filters)
    except QueryError as exc:
        raise APIError(400, str(exc), param=exc.param) from None


async def stored_session(s: ServerState, session_id: str) -> Transcript:
    found = await s.read_store(store_of(s).get, session_id)
    if found is None:
        raise APIError(404, f"session {session_id!r} is not in the store", param="session_id", code="not_found")
    return found


def request_policy(raw: dict[str, Any] | str | None, stored: Transcript) -> Policy | None:
    """The policy a replay request gives, validated against the session's detectors; 400 when invalid."""
    if raw is None:
        return None
    source = "<request policy>"
    try:
        data = read_policy_yaml(raw, source) if isinstance(raw, str) else raw
        return parse_policy(data, source, dict(stored.thresholds))
    except PolicyError as exc:
        raise APIError(400, str(exc), param="policy") from None


def full_replay_blocker(s: ServerState, stored: Transcript) -> str | None:
    """Why this server cannot replay `stored` in full (another model or other detectors), or None."""
    info = s.pipeline.engine.info
    if (info.model_id, info.revision) != (stored.model.model_id, stored.model.revision):
        ran, runs = f"{stored.model.model_id}@{stored.model.revision}", f"{info.model_id}@{info.revision}"
        return f"the session ran on {ran}, this server runs {runs}"
    if [d.to_dict() for d in s.pipeline.specs] != [d.to_dict() for d in stored.detector_specs]:
        return "the session's detectors differ from this server's"
    return None


async def replay_session(s: ServerState, session_id: str, body: ReplayRequest) -> ReplayResult:
    """What POST /v1/sessions/{id}/replay (and the viewer's replay button) does."""
    stored = await stored_session(s, session_id)
    policy = request_policy(body.policy, stored)
    blocker = full_replay_blocker(s, stored)
    mode = body.mode if body.mode != "auto" else ("policy" if blocker else "full")
    if mode == "policy":
        try:
            return replay_policy(stored, policy or stored_policy(stored))
        except PolicyError as exc:
            raise APIError(400, str(exc), param="policy") from None
    if blocker:
        raise APIError(409, f"cannot replay in full here: {blocker}; use mode 'policy' or `cotmon replay`", param="mode")
    async with s.admission.slot():
        return await replay_full(s.pipeline, stored, policy=policy or stored_policy(stored))


router = APIRouter()


@router.get("/v1/sessions")
async def list_sessions(request: Request, query: Annotated[SessionQuery, Depends(session_query)]) -> dict[str, Any]:
    """Stored sessions, newest first, with their flags; filters as query parameters."""
    s = server_state(request)
    store = store_of(s)
    rows = await s.read_store(store.sessions, query)
    total = await s.read_store(store.count, SessionQuery(**{**query.__dict__, "limit": None, "offset": 0}))
    return {"object": "list", "data": [r.to_dict() for r in rows], "total": total, "limit": query.limit, "offset": query.offset}


@router.get("/v1/sessions/{session_id}")
async def get_session(request: Request, session_id: str) -> dict[str, Any]:
    """One stored session, whole: messages, tokens with channels and readouts, detections, flags, specs, policy."""
    return transcript_to_dict(await stored_session(server_state(request), session_id))


@router.post("/v1/sessions/{session_id}/replay")
async def replay(request: Request, session_id: str, body: ReplayRequest | None = None) -> dict[str, Any]:
    """Replay a stored session and diff its flags (see ReplayRequest.mode)."""
    result = await replay_session(server_state(request), session_id, body or ReplayRequest(policy=None, mode="auto"))
    return result.to_dict()
