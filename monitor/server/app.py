"""`create_app`: the OpenAI-compatible HTTP API around a monitoring pipeline.

Every 4xx carries an OpenAI-style error body; unexpected failures become a 500 with the same
shape rather than a dropped connection. The routes themselves live in `monitor.server.routes`.
"""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from monitor.engine.base import EngineError
from monitor.observability import Metrics, get_logger
from monitor.pipeline import Pipeline
from monitor.server.hosts import HostCheck, allowed_hosts
from monitor.server.logins import LoginThrottle, LoginTokens
from monitor.server.protocol import APIError, error_body, openai_param
from monitor.settings import Settings
from monitor.store import StoreError, TranscriptStore
from monitor.store.spool import SpooledStore

T = TypeVar("T")
STORE_FAILURES = (StoreError, SQLAlchemyError)
"""What a store that is down or unreachable raises: a 503, not a 500."""


class Admission:
    """At most `max_concurrent` streams run; `max_queued` more wait; anyone beyond gets a 429."""

    def __init__(self, max_concurrent: int, max_queued: int):
        self._slots = asyncio.Semaphore(max_concurrent)
        self._limit = max_concurrent + max_queued
        self.inside = 0

    async def enter(self) -> None:
        if self.inside >= self._limit:
            raise APIError(
                429,
                "too many concurrent requests; retry shortly",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        self.inside += 1
        try:
            await self._slots.acquire()
        except BaseException:
            self.inside -= 1
            raise

    def leave(self) -> None:
        self._slots.release()
        self.inside -= 1


@dataclass
class ServerState:
    """What the routes share; one per app."""

    settings: Settings
    pipeline: Pipeline
    metrics: Metrics
    model_name: str
    admission: Admission
    store: TranscriptStore | None
    """Where sessions are kept; None serves no session routes (404s with a clear message)."""
    spool: SpooledStore | None = None
    """The pipeline's sink in front of `store`, when sessions reach it through the local spool."""
    store_threads: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=4, thread_name_prefix="cotmon-store-read")
    )
    """Store reads run here, off the event loop and apart from the engine's threads: a stalled
    database ties up these threads only."""
    logins: LoginTokens = field(default_factory=LoginTokens)
    """The viewer's login cookies."""
    login_throttle: LoginThrottle = field(default_factory=LoginThrottle)
    """Failed viewer logins per client address."""

    async def read_store(self, call: Callable[..., T], *args: Any, path: str = "") -> T:
        """`call(*args)` on a store thread; a 503 naming no internals when the store fails or takes
        longer than its timeout."""
        timeout = self.settings.store_timeout + 1
        try:
            future = asyncio.get_running_loop().run_in_executor(self.store_threads, call, *args)
            return await asyncio.wait_for(future, timeout)
        except (*STORE_FAILURES, TimeoutError) as exc:
            raise store_unavailable(exc, path) from None


def store_unavailable(exc: Exception, path: str) -> APIError:
    """The 503 for a store failure; the detail (which may name the database) goes to the log only."""
    get_logger("cotmon.server").error("store_unavailable", path=path, error=f"{type(exc).__name__}: {exc}")
    return APIError(
        503,
        "transcript store unavailable; retry later",
        type="server_error",
        code="store_unavailable",
        headers={"Retry-After": "5"},
    )


class BodyLimit:
    """Refuses request bodies over `limit` bytes with a 413 before they are read whole.

    A declared Content-Length over the limit is refused at once. A body without one (chunked) is
    counted as it is read; once past the limit, reading fails, and whatever the app answers to
    that (FastAPI: a 400 "error parsing the body") is replaced by the 413, unless the app already
    answered a 413 itself (the viewer's HTML page) or had started its answer before.
    """

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    def too_large(self) -> APIError:
        return APIError(413, f"request body is larger than {self.limit} bytes", code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _send_error(send, self.too_large())
            return
        seen, exceeded, started, replaced = 0, False, False, False

        async def counted() -> Message:
            nonlocal seen, exceeded
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                exceeded = True
                raise self.too_large()
            return message

        async def answer(message: Message) -> None:
            nonlocal started, replaced
            if message["type"] == "http.response.start" and not started:
                started = True
                replaced = exceeded and message["status"] != 413
            if not replaced:
                await send(message)

        try:
            await self.app(scope, counted, answer)
        except Exception:
            if not exceeded or (started and not replaced):
                raise
        if exceeded and (replaced or not started):
            await _send_error(send, self.too_large())


class CrashGuard:
    """An unexpected exception becomes a logged 500 with an OpenAI-style body, and goes no further.

    (Starlette's own handler for `Exception` re-raises after answering, which makes the server
    log a traceback and drop the keep-alive connection.) Once a response has started, e.g. a
    stream, nothing more can be said on it; the route turns its failures into SSE error events.
    """

    def __init__(self, app: ASGIApp):
        self.app = app
        self.log = get_logger("cotmon.server")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except Exception as exc:
            self.log.error(
                "request_failed", path=scope.get("path"), error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()
            )
            if not started:
                await _send_error(send, APIError(500, "internal error", type="server_error"))


async def _send_error(send: Send, err: APIError) -> None:
    response = JSONResponse(err.body(), status_code=err.status, headers=err.headers)
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


def create_app(
    settings: Settings,
    pipeline: Pipeline,
    *,
    store: TranscriptStore | None = None,
    spool: SpooledStore | None = None,
    metrics: Metrics | None = None,
    model_name: str | None = None,
) -> FastAPI:
    """The API for `pipeline`, served under `model_name` (default: the model id); `store` is the
    pipeline's transcript store, which the session routes and the viewer read; `spool` the sink in
    front of it, whose state `/readyz` reports."""
    from monitor.server.routes import router

    # No /docs or /redoc (they load Swagger and ReDoc from a CDN into the viewer's origin); the schema
    # is served by routes.openapi_schema, behind the API key like every /v1 route.
    app = FastAPI(
        title="cotmon",
        version="0.1.0",
        description="OpenAI-compatible API with chain-of-thought monitoring.",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.cotmon = ServerState(
        settings=settings,
        pipeline=pipeline,
        metrics=metrics or pipeline.metrics,
        model_name=model_name or settings.served_model_name or pipeline.engine.info.model_id,
        admission=Admission(settings.max_concurrent, settings.max_queued),
        store=store,
        spool=spool,
    )
    app.include_router(router)
    log = get_logger("cotmon.server")

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = list(first.get("loc", ()))
        param = openai_param(loc[1:] if loc[:1] == ["body"] else loc)
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(error_body(str(exc.detail), code=code), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(EngineError)
    async def engine_failed(request: Request, exc: EngineError) -> JSONResponse:
        log.error("engine_failed", path=request.url.path, error=str(exc))
        return JSONResponse(error_body(str(exc), type="upstream_error"), status_code=502)

    @app.exception_handler(StoreError)
    @app.exception_handler(SQLAlchemyError)
    async def store_failed(request: Request, exc: Exception) -> JSONResponse:
        err = store_unavailable(exc, request.url.path)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    app.add_middleware(CrashGuard)
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    app.add_middleware(HostCheck, allowed=allowed_hosts(settings))  # outermost: a foreign Host gets nothing else
    return app
