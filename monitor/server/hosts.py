"""The Host header check: requests must address this server by a name it knows.

Without it, a web page can rebind its own DNS name to 127.0.0.1 and read the API and the viewer
from the victim's browser (DNS rebinding): the browser thinks it talks to the page's own origin,
and sends that origin's name as Host. Loopback names, IP addresses the server was told to listen
on and names an operator lists cannot be such a page's name.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from monitor.server.protocol import APIError
from monitor.settings import Settings

LOOPBACK = frozenset({"localhost", "127.0.0.1", "[::1]"})
ANY = "*"
WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::", "[::]"})

# Not checked: Kubernetes probes and Prometheus address the pod by its IP, which no setting can
# know in advance. These routes hold no transcript data and are open without the API key too.
UNCHECKED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def host_name(host: str) -> str:
    """A Host header's name, without its port, lower-cased, without a trailing dot; IPv6 in brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        name = host[: host.find("]") + 1] if "]" in host else host
    elif host.count(":") > 1:  # a bare IPv6 address (as --host takes it)
        name = f"[{host}]"
    else:
        name = host.partition(":")[0]
    return name.rstrip(".")


def allowed_hosts(settings: Settings) -> frozenset[str] | None:
    """The host names requests may use: loopback, --host unless it is a wildcard address, and
    `settings.allowed_hosts`; None when that lists `*` (no check)."""
    if ANY in settings.allowed_hosts:
        return None
    listen = {host_name(settings.host)} if settings.host.strip() not in WILDCARD_BINDS else set()
    return LOOPBACK | listen | {host_name(h) for h in settings.allowed_hosts}


class HostCheck:
    """Answers a 400 (OpenAI-style body, `param` Host) to a request whose Host header is missing or
    not in `allowed` (None: every host is allowed); /healthz, /readyz and /metrics are not checked."""

    def __init__(self, app: ASGIApp, allowed: frozenset[str] | None):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.allowed is None or _route_path(scope) in UNCHECKED_PATHS:
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("host")
        if given is not None and host_name(given) in self.allowed:
            await self.app(scope, receive, send)
            return
        shown = "no Host header" if given is None else f"the Host header {given[:100]!r}"
        err = APIError(
            400,
            f"{shown} is not a host this server answers to; an operator can allow it with COTMON_ALLOWED_HOSTS",
            param="Host",
            code="host_not_allowed",
        )
        await JSONResponse(err.body(), status_code=err.status)(scope, receive, send)


def _route_path(scope: Scope) -> str:
    path, root = str(scope.get("path", "")), str(scope.get("root_path", ""))
    return path[len(root) :] if root and path.startswith(root) else path
