"""`create_app`: the OpenAI-compatible HTTP API around a monitoring pipeline.

Every 4xx carries an OpenAI-style error body; unexpected failures become a 500 with the same
shape rather than a dropped connection. This module composes the app: the state its routes share
(`state`), the routers (`routes`, `sessions`, the viewer in `ui.views`) behind the guards each
needs (`auth`), the error handlers and the middleware (`middleware`, `hosts`).
"""

from __future__ import annotations

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from monitor.engine.base import EngineError
from monitor.observability import Metrics, get_logger
from monitor.pipeline import Pipeline
from monitor.server import routes, sessions
from monitor.server.admission import Admission
from monitor.server.auth import require_key
from monitor.server.hosts import HostCheck, allowed_hosts
from monitor.server.middleware import BodyLimit, CrashGuard
from monitor.server.protocol import APIError, error_body, openai_param
from monitor.server.state import ServerState, store_unavailable
from monitor.server.ui import views
from monitor.server.ui.web import require_login
from monitor.settings import Settings
from monitor.store import StoreError, TranscriptStore
from monitor.store.spool import SpooledStore


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
    _include_routers(app)
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


def _include_routers(app: FastAPI) -> None:
    """The routes, in the order they are matched, each behind the guard it needs."""
    with_key = [Depends(require_key)]
    app.include_router(routes.open_routes)  # health, readiness, metrics: no key
    app.include_router(routes.api, dependencies=with_key)
    app.include_router(sessions.router, dependencies=with_key)
    # The viewer: its own login (cookie or bearer key) and HTML errors; its catch-all 404 comes last.
    app.include_router(views.public, prefix="/ui", include_in_schema=False)
    app.include_router(views.pages, prefix="/ui", include_in_schema=False, dependencies=[Depends(require_login)])
    app.include_router(views.fallback, prefix="/ui", include_in_schema=False)
