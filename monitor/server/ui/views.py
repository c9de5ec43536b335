"""The transcript viewer's pages under `/ui/`: session list, one session, replay, login.

Server-rendered HTML with no JavaScript: filters and the detector choice are GET forms, replay
and login are POST forms. The pages read the store through the same calls as `/v1/sessions`.

`create_app` mounts the three routers under `/ui`, in this order: `public` (login, logout, runbook,
stylesheets), `pages` (behind the login) and `fallback` (an HTML 404 for any other path).
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import yaml
from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse

from monitor.server.auth import key_matches
from monitor.server.protocol import APIError
from monitor.server.sessions import ReplayMode, ReplayRequest, replay_session, session_query, stored_session
from monitor.server.state import server_state
from monitor.server.ui import render
from monitor.server.ui.web import (
    COOKIE,
    HERE,
    UIRoute,
    base_url,
    check_origin,
    error_page,
    form_fields,
    page,
    safe_next,
)
from monitor.store import SessionQuery
from monitor.types import OUTCOMES, SEVERITIES, Transcript

FILTERS = ("flagged", "category", "rule", "severity", "outcome", "label", "since", "until")
REPLAY_MODES: dict[str, ReplayMode] = {"auto": "auto", "full": "full", "policy": "policy"}
STYLESHEETS: dict[str, Path] = {p.name: p for p in (HERE / "static").glob("*.css")}

public = APIRouter(route_class=UIRoute)
pages = APIRouter(route_class=UIRoute)
fallback = APIRouter(route_class=UIRoute)


def _flagged(value: str) -> bool | None:
    choices = {"": None, "any": None, "yes": True, "true": True, "1": True, "no": False, "false": False, "0": False}
    if value.lower() not in choices:
        raise APIError(400, "flagged must be yes, no or any", param="flagged")
    return choices[value.lower()]


def _int(value: str, name: str, default: int) -> int:
    try:
        return int(value) if value.strip() else default
    except ValueError:
        raise APIError(400, f"{name} must be a whole number, got {value!r}", param=name) from None


def _naming_the_parameter(err: APIError) -> str:
    return f"{err.param}: {err.message}" if err.param and not err.message.startswith(err.param) else err.message


def list_query(params: dict[str, str]) -> SessionQuery:
    """The list page's query parameters -> SessionQuery, meaning what they mean in GET /v1/sessions."""
    return session_query(
        flagged=_flagged(params.get("flagged", "")),
        category=params.get("category"),
        rule=params.get("rule"),
        severity=params.get("severity") or None,
        outcome=params.get("outcome"),
        label=params.get("label"),
        since=params.get("since"),
        until=params.get("until"),
        limit=_int(params.get("limit", ""), "limit", 50),
        offset=_int(params.get("offset", ""), "offset", 0),
    )


@pages.get("/", response_class=HTMLResponse)
async def session_list(request: Request) -> HTMLResponse:
    """Stored sessions, newest first, filtered and paged."""
    s = server_state(request)
    params = {k: v for k, v in request.query_params.items() if k in (*FILTERS, "limit", "offset")}
    context: dict[str, Any] = {"params": params, "severities": SEVERITIES, "outcomes": OUTCOMES}
    context |= {"no_store": s.store is None, "error": None, "rows": [], "total": 0, "query": None, "newer": None, "older": None}
    if s.store is None:
        return page(request, "list.html", **context)
    try:
        query = list_query(params)
    except APIError as err:
        return page(request, "list.html", err.status, **(context | {"error": _naming_the_parameter(err)}))
    store = s.store
    rows = await s.read_store(store.sessions, query)
    total = await s.read_store(store.count, dataclasses.replace(query, limit=None, offset=0))
    limit = query.limit or 50
    kept = {k: v for k, v in params.items() if v and k != "offset"}
    if query.offset > 0:
        context["newer"] = urlencode({**kept, "offset": max(0, query.offset - limit)})
    if query.offset + len(rows) < total:
        context["older"] = urlencode({**kept, "offset": query.offset + limit})
    return page(request, "list.html", **(context | {"rows": rows, "total": total, "query": query}))


@pages.get("/sessions/{session_id:path}/replay")
async def replay_link(request: Request, session_id: str) -> RedirectResponse:
    """A replay result reloaded or bookmarked (a GET): back to the session, where the button is."""
    return RedirectResponse(f"{base_url(request)}/sessions/{quote(session_id, safe='')}#replay", status_code=303)


@pages.get("/sessions/{session_id:path}", response_class=HTMLResponse)
async def session_page(request: Request, session_id: str) -> HTMLResponse:
    """One session: messages, the CoT and answer shaded by a detector's scores, flags, evidence, replay."""
    t = await stored_session(server_state(request), session_id)
    # A long session takes a while to lay out (~0.6 s for 25k tokens): off the event loop, which
    # meanwhile serves the API and the health checks.
    return await asyncio.to_thread(_session_page, request, t)


def _session_page(request: Request, t: Transcript) -> HTMLResponse:
    names = render.detector_names(t)
    chosen = request.query_params.get("detector") or render.default_detector(t)
    reasoning, answer = render.token_views(t, chosen)
    return page(
        request,
        "session.html",
        t=t,
        detectors=names,
        detector=chosen,
        has_scores=any(d.detector == chosen for d in t.detections),
        reasoning=reasoning,
        answer=answer,
        evidence=list(render.evidence_sections(t)),
        policy_name=str(t.policy.get("name") or "(unnamed)"),
        policy_yaml=_policy_yaml(t.policy),
        session_id=t.session_id,
        modes=tuple(REPLAY_MODES),
        mode="auto",
    )


@pages.post("/sessions/{session_id:path}/replay", response_class=HTMLResponse)
async def replay(request: Request, session_id: str) -> HTMLResponse:
    """Replay the session (the viewer's replay button) and show how its flags change."""
    check_origin(request)
    fields = await form_fields(request)
    mode = fields.get("mode", "auto")
    policy_text = fields.get("policy", "")
    context: dict[str, Any] = {"session_id": session_id, "modes": tuple(REPLAY_MODES), "mode": mode, "policy_yaml": policy_text}
    if mode not in REPLAY_MODES:
        return page(request, "replay.html", 400, error=f"mode must be one of {', '.join(REPLAY_MODES)}", result=None, **context)
    body = ReplayRequest(policy=policy_text if policy_text.strip() else None, mode=REPLAY_MODES[mode])
    try:
        result = await replay_session(server_state(request), session_id, body)
    except APIError as err:
        return page(request, "replay.html", err.status, error=err.message, result=None, **context)
    return page(request, "replay.html", error=None, result=result, **context)


def _policy_yaml(policy: Any) -> str:
    return yaml.safe_dump(dict(policy), sort_keys=False, allow_unicode=True)


@public.get("/login", response_class=HTMLResponse)
async def login_form(request: Request) -> Response:
    if server_state(request).settings.api_key is None:
        return RedirectResponse(base_url(request) + "/", status_code=303)
    return page(request, "login.html", next=safe_next(request.query_params.get("next"), request), error=None)


@public.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    """Check the API key (constant time) and set the HttpOnly, SameSite=Strict login cookie: a new
    token per login. Too many failed logins from one address get a 429 for a while."""
    check_origin(request)
    s = server_state(request)
    key = s.settings.api_key
    fields = await form_fields(request)
    target = safe_next(fields.get("next"), request)
    if key is None:
        return RedirectResponse(target, status_code=303)
    client = request.client.host if request.client else ""
    wait = s.login_throttle.retry_after(client)
    if wait is not None:
        message = f"Too many failed logins from your address; try again in {wait} s."
        refused = page(request, "login.html", 429, next=target, error=message)
        refused.headers["Retry-After"] = str(wait)
        return refused
    if not key_matches(fields.get("key", ""), key):
        s.login_throttle.failed(client)
        return page(request, "login.html", 401, next=target, error="That is not this server's API key.")
    s.login_throttle.succeeded(client)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        COOKIE,
        s.logins.issue(key),
        max_age=int(s.logins.ttl_s),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path=base_url(request),
    )
    return response


@public.post("/logout")
async def logout(request: Request) -> Response:
    """Forget the login: the cookie's token is refused from now on, even if it was copied."""
    check_origin(request)
    s = server_state(request)
    cookie = request.cookies.get(COOKIE)
    if cookie is not None and s.settings.api_key is not None:
        s.logins.revoke(cookie, s.settings.api_key)
    response = RedirectResponse(base_url(request) + "/login", status_code=303)
    response.delete_cookie(COOKIE, path=base_url(request), httponly=True, samesite="strict")
    return response


@public.get("/runbook", response_class=HTMLResponse)
async def runbook(request: Request) -> HTMLResponse:
    """What each of the chart's alerts means and what to do: their runbook_url points here. Public
    (no login): it holds no transcript data, and on-call people reach it from a phone."""
    return page(request, "runbook.html")


@public.get("/static/{name}")
async def stylesheet(name: str) -> Response:
    """The viewer's CSS (a fixed set of files: no path from the request reaches the file system)."""
    found = STYLESHEETS.get(name)
    if found is None:
        raise APIError(404, f"no stylesheet {name!r}", code="not_found")
    return Response(found.read_bytes(), media_type="text/css", headers={"Cache-Control": "public, max-age=3600"})


@fallback.get("/{rest:path}", response_class=HTMLResponse)
async def not_found(request: Request, rest: str) -> HTMLResponse:
    """Any other path under /ui/: an HTML 404 with the same headers, not the API's JSON."""
    return error_page(request, 404, f"there is no page at {request.url.path}")
