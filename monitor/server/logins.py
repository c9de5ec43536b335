"""The viewer's logins: a throttle on failed logins per client address."""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable

Clock = Callable[[], float]

MAX_FAILED_LOGINS = 5
FAILED_LOGIN_WINDOW_S = 300.0
"""After MAX_FAILED_LOGINS failed logins from one address within this many seconds, that address
may not try again until the oldest of them is this old."""


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
