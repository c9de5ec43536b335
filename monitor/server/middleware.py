"""The API's own ASGI middleware: a request body limit, and a guard that turns a crash into a 500."""

from __future__ import annotations

import traceback

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from monitor.observability import get_logger
from monitor.server.protocol import APIError


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
