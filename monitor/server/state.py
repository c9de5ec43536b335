"""What the routes share (`ServerState`, one per app), how a request finds it, and how a store
failure is answered."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import Request

from monitor.observability import Metrics, get_logger
from monitor.pipeline import Pipeline
from monitor.server.admission import Admission
from monitor.server.logins import LoginThrottle, LoginTokens
from monitor.server.protocol import APIError
from monitor.settings import Settings
from monitor.store import StoreError, TranscriptStore
from monitor.store.spool import SpooledStore

T = TypeVar("T")
STORE_FAILURES = (StoreError, SQLAlchemyError)
"""What a store that is down or unreachable raises: a 503, not a 500."""


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


def server_state(request: Request) -> ServerState:
    """The state of the app serving `request` (set by `create_app`)."""
    return request.app.state.cotmon  # type: ignore[no-any-return]


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
