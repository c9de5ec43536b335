"""The API key: a bearer header compared in constant time, for the API and the viewer alike."""

from __future__ import annotations

import hmac

from starlette.requests import Request

from monitor.server.protocol import APIError
from monitor.server.state import server_state


def key_matches(given: str, key: str) -> bool:
    """Constant-time comparison, so the answer's timing tells nothing about the key."""
    return hmac.compare_digest(given.encode(), key.encode())


def has_bearer_key(request: Request, key: str) -> bool:
    """The request carries `key` as `Authorization: Bearer <key>`."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and key_matches(given.strip(), key)


def require_key(request: Request) -> None:
    """Dependency of the API's routes: the bearer API key, when one is configured; a 401 without it."""
    key = server_state(request).settings.api_key
    if key is not None and not has_bearer_key(request, key):
        raise APIError(401, "missing or invalid API key", type="authentication_error", code="invalid_api_key")
