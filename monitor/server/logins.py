"""The viewer's logins: a fresh signed token per login that logout revokes, and a throttle on
failed logins per client address."""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable

Clock = Callable[[], float]

LOGIN_TTL_S = 12 * 3600
"""How long a login lasts."""
MAX_FAILED_LOGINS = 5
FAILED_LOGIN_WINDOW_S = 300.0
"""After MAX_FAILED_LOGINS failed logins from one address within this many seconds, that address
may not try again until the oldest of them is this old."""


class LoginTokens:
    """Login cookie values: `<expiry>.<nonce>.<hmac>`, signed with a key derived from the API key.

    A token is good until it expires or is revoked (logout). Every replica with the same API key
    accepts it, with no shared state; a revocation is kept by the process that saw the logout, so
    another replica may accept a revoked token until it expires. A new API key voids every token.

    Args:
        ttl_s: how long a token is good for.
        clock: unix time.
    """

    def __init__(self, ttl_s: float = LOGIN_TTL_S, clock: Clock = time.time):
        self.ttl_s, self.clock = ttl_s, clock
        self._revoked: dict[str, float] = {}
        """nonce -> expiry of the tokens logged out and not expired yet."""

    def issue(self, key: str) -> str:
        expiry = str(math.ceil(self.clock() + self.ttl_s))
        nonce = secrets.token_urlsafe(18)
        return f"{expiry}.{nonce}.{_signature(key, expiry, nonce)}"

    def valid(self, token: str, key: str) -> bool:
        nonce = self._nonce(token, key)
        return nonce is not None and nonce not in self._revoked

    def revoke(self, token: str, key: str) -> None:
        """Refuse `token` from now on (in this process); an invalid token is ignored."""
        nonce = self._nonce(token, key)
        if nonce is None:
            return
        now = self.clock()
        self._revoked = {n: expiry for n, expiry in self._revoked.items() if expiry > now}
        self._revoked[nonce] = float(token.partition(".")[0])

    def _nonce(self, token: str, key: str) -> str | None:
        """The nonce of a well-signed, unexpired token; None for any other."""
        parts = token.split(".")
        if len(parts) != 3 or not parts[0].isdigit():
            return None
        expiry, nonce, signature = parts
        if not hmac.compare_digest(signature.encode(), _signature(key, expiry, nonce).encode()):
            return None
        return nonce if int(expiry) > self.clock() else None


def _signature(key: str, expiry: str, nonce: str) -> str:
    signing_key = hmac.new(key.encode(), b"cotmon ui login token", hashlib.sha256).digest()
    return hmac.new(signing_key, f"{expiry}.{nonce}".encode(), hashlib.sha256).hexdigest()


class LoginThrottle:
    """Counts failed logins per client address and says when one must wait.

    Args:
        max_failures: failed logins allowed within `window_s`; the next attempt gets a 429.
        window_s: the window, in seconds.
        clock: monotonic time.
        max_clients: addresses remembered; the one that failed least recently is forgotten first.
    """

    def __init__(
        self,
        max_failures: int = MAX_FAILED_LOGINS,
        window_s: float = FAILED_LOGIN_WINDOW_S,
        clock: Clock = time.monotonic,
        max_clients: int = 10_000,
    ):
        self.max_failures, self.window_s, self.clock, self.max_clients = max_failures, window_s, clock, max_clients
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, client: str) -> int | None:
        """Whole seconds `client` must wait before trying again; None when it may try now."""
        recent = self._failures.get(client)
        if recent is None or len(recent) < self.max_failures:
            return None
        wait = recent[0] + self.window_s - self.clock()
        return math.ceil(wait) if wait > 0 else None

    def failed(self, client: str) -> None:
        recent = self._failures.pop(client, None) or deque(maxlen=self.max_failures)
        recent.append(self.clock())
        self._failures[client] = recent  # now the most recent
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)
