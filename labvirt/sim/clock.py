"""Time for the simulated controllers: the real loop in the server, a fake one in tests.

Controllers never sleep; they ask a ``Scheduler`` to call them back at a time. The server's
scheduler rides the asyncio loop; ``FakeScheduler`` runs due callbacks when a test advances it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from typing import Protocol


class Scheduler(Protocol):
    def now(self) -> float:
        """Seconds since the epoch, as the controllers see it."""

    def call_at(self, when: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` once ``now() >= when``."""


class AsyncioScheduler:
    """Wall-clock time; callbacks run on the event loop the server serves from."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def now(self) -> float:
        return time.time()

    def call_at(self, when: float, callback: Callable[[], None]) -> None:
        delay = max(0.0, when - time.time())
        self._loop.call_later(delay, callback)


class FakeScheduler:
    """A clock that moves only when told to; ``advance`` runs what fell due, in time order."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self._now

    def call_at(self, when: float, callback: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (when, next(self._order), callback))

    def advance(self, seconds: float) -> None:
        target = self._now + seconds
        while self._queue and self._queue[0][0] <= target:
            when, _, callback = heapq.heappop(self._queue)
            self._now = max(self._now, when)
            callback()
        self._now = target

    def pending(self) -> int:
        return len(self._queue)
