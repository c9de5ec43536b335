"""Admission: how many streams the engine runs at once, how many more may wait, and a 429 beyond."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from monitor.server.protocol import APIError


class Admission:
    """At most `max_concurrent` streams run; `max_queued` more wait; anyone beyond gets a 429."""

    def __init__(self, max_concurrent: int, max_queued: int):
        self._slots = asyncio.Semaphore(max_concurrent)
        self._limit = max_concurrent + max_queued
        self.inside = 0
        """Streams running or waiting for a slot."""

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Holds a running slot for the body, after waiting for one; a 429 at once when the queue
        is full too. A stream that outlives its route (SSE) takes the slot along with
        `AsyncExitStack.pop_all`."""
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
        try:
            yield
        finally:
            self._slots.release()
            self.inside -= 1
