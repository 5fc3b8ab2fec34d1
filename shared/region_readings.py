"""What one process knows of its regions' load for a moment: a read of Redis, and the sessions
it placed since.

Reading a region's counts costs a few dozen ``SCARD``/``ZCARD`` (its session indexes are split
over sixteen shards); on the warm claim, the API's hot path, that was a third of the work. So
``RegionPicker`` keeps its last reading for ``max_age`` seconds, counting into it each session
the process places, and chooses from it only while every region stays far from every limit:

- a refusal, or a choice near a cap, a region's capacity or the end of a warm pool, is always
  made on a fresh reading, as before: there the bound stays "creates racing for the last place
  may pass it by the few in flight";
- far from them, what other processes placed meanwhile (at most ``max_age`` seconds of their
  creates) cannot change the choice unless they took more than the margin, ``NEAR_FRACTION`` of
  the limit and at least ``NEAR_MINIMUM``;
- a drain or undrain changes ``RedisRegionState.version``, which is read on every choice: the
  next create of every process reads afresh. A region going down is seen within ``max_age``
  (its heartbeat lasts three intervals anyway).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Final

from shared.adapters.region_state import RegionFlags
from shared.adapters.session_indexes import LiveCount
from shared.domain.pools.config import PoolKey
from shared.domain.regions import RegionState
from shared.domain.sessions import Session

# How long the API's processes keep a reading (``shared.runtime.build_runtime``).
READING_SECONDS: Final = 1.0
# How far from a limit a region must be for a reading up to ``max_age`` old to decide.
NEAR_FRACTION: Final = 0.1
NEAR_MINIMUM: Final = 8


@dataclass(frozen=True)
class RegionReading:
    """The regions' flags and counts as read at ``taken_at`` (monotonic), at ``version``."""

    version: int
    taken_at: float
    flags: Mapping[str, RegionFlags]
    live: Mapping[str, LiveCount]
    held: Mapping[PoolKey, tuple[int, int]]  # (ready, booting) environments of each pool

    def with_placed(self, session: Session) -> RegionReading:
        """This reading with ``session`` counted in: one more live session of its region and
        template, booting (a cold start) or in a ready environment taken from its pool."""
        count = self.live.get(session.region)
        if count is None:
            return self
        by_template = dict(count.by_template)
        by_template[session.template] = by_template.get(session.template, 0) + 1
        booting = count.booting + (0 if session.warm else 1)
        live = {**self.live, session.region: LiveCount(count.total + 1, by_template, booting)}
        held = dict(self.held)
        if session.warm:
            key = PoolKey(session.region, session.template)
            ready, pool_booting = held.get(key, (0, 0))
            held[key] = (max(0, ready - 1), pool_booting)
        return replace(self, live=live, held=held)


def far_from_limits(state: RegionState, vms: int) -> bool:
    """Whether ``state``'s limits are far enough that a slightly old reading decides as a fresh
    one would: its cap of live sessions, and, unless it has warm environments enough (a claim
    boots nothing and adds no VM), its cap of booting environments and its capacity."""
    if _near(state.live_sessions, state.max_live_sessions):
        return False
    if state.warm >= NEAR_MINIMUM:
        return True
    if _near(state.booting, state.max_booting):
        return False
    return not _near(state.vms_in_use + vms, state.capacity_vms)


def _near(used: int, limit: int | None) -> bool:
    if limit is None:
        return False
    return limit - used < max(NEAR_MINIMUM, math.ceil(limit * NEAR_FRACTION))


class ReadingCache:
    """The last reading, shared by the process's threads."""

    def __init__(self, *, max_age: float, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.max_age = max_age
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._reading: RegionReading | None = None

    def now(self) -> float:
        return self._monotonic()

    def get(self, version: int) -> RegionReading | None:
        """The reading if it is young enough and taken at ``version``."""
        with self._lock:
            reading = self._reading
        if reading is None or reading.version != version:
            return None
        if self._monotonic() - reading.taken_at > self.max_age:
            return None
        return reading

    def put(self, reading: RegionReading) -> None:
        with self._lock:
            if self._reading is None or reading.taken_at >= self._reading.taken_at:
                self._reading = reading

    def placed(self, session: Session) -> None:
        with self._lock:
            if self._reading is not None:
                self._reading = self._reading.with_placed(session)
