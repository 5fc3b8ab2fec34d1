"""Each region's liveness and drain flag in Redis, and the workers' heartbeat that keeps the first.

- ``labvirt:region:<region>:alive``: set by every worker whose informer of the region is synced
  and whose last list or watch succeeded, with a TTL of three heartbeat intervals
  (``RegionHeartbeat``). A region whose workers are silent, or whose API they cannot list or
  watch, loses it within that TTL: it is *down*.
- ``labvirt:regions:followed``: the regions any worker ever reported. A region no worker ever
  reported (a fresh Redis, workers still starting) counts as up: creates queue their work,
  as they always did; once reported, silence means down.
- ``labvirt:region:<region>:drained``: an operator's flag (``PUT /v1/admin/regions/<region>``):
  no new sessions and no new warm environments there; what runs finishes.
- ``labvirt:regions:version``: counts the changes of those flags, so a process that keeps what it
  read for a moment (``shared.regions.RegionPicker``) sees a drain at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis
import structlog

log = structlog.get_logger(__name__)

# A heartbeat lives this many intervals: one or two missed beats are not an outage.
HEARTBEAT_TTL_INTERVALS = 3


@dataclass(frozen=True)
class RegionFlags:
    """What Redis says about one region: ``alive`` is None when no worker ever reported it."""

    alive: bool | None
    drained: bool

    @property
    def down(self) -> bool:
        return self.alive is False


class RedisRegionState:
    def __init__(self, client: redis.Redis, *, prefix: str = "labvirt") -> None:
        self._redis = client
        self._prefix = prefix

    @property
    def client(self) -> redis.Redis:
        return self._redis

    def _alive_key(self, region: str) -> str:
        return f"{self._prefix}:region:{region}:alive"

    def _drained_key(self, region: str) -> str:
        return f"{self._prefix}:region:{region}:drained"

    @property
    def _followed_key(self) -> str:
        return f"{self._prefix}:regions:followed"

    @property
    def _version_key(self) -> str:
        return f"{self._prefix}:regions:version"

    def version(self) -> int:
        """Changes of the drain flags so far (none: 0)."""
        return int(self._redis.get(self._version_key) or 0)

    def queue_version(self, pipe: Any) -> Callable[[Iterator[Any]], int]:
        """Queue ``version``'s read on ``pipe``; the function returned takes its answer."""
        pipe.get(self._version_key)
        return lambda answers: int(next(answers) or 0)

    def heartbeat(self, regions: Iterable[str], *, ttl_seconds: float) -> None:
        """Mark ``regions`` alive for ``ttl_seconds``."""
        regions = list(regions)
        if not regions:
            return
        pipe = self._redis.pipeline(transaction=False)
        for region in regions:
            pipe.set(self._alive_key(region), "1", px=max(1, int(ttl_seconds * 1000)))
        pipe.sadd(self._followed_key, *regions)
        pipe.execute()

    def flags(self, regions: Sequence[str]) -> dict[str, RegionFlags]:
        """Liveness and drain flag of each region, in one round trip."""
        pipe = self._redis.pipeline(transaction=False)
        for region in regions:
            pipe.exists(self._alive_key(region))
            pipe.exists(self._drained_key(region))
        pipe.smembers(self._followed_key)
        *raw, followed_raw = pipe.execute()
        followed = {_text(r) for r in followed_raw}
        found: dict[str, RegionFlags] = {}
        for i, region in enumerate(regions):
            alive = bool(raw[2 * i]) if region in followed else (True if raw[2 * i] else None)
            found[region] = RegionFlags(alive=alive, drained=bool(raw[2 * i + 1]))
        return found

    def set_drained(self, region: str, drained: bool) -> None:
        pipe = self._redis.pipeline(transaction=False)  # two keys; each write stands alone
        if drained:
            pipe.set(self._drained_key(region), "1")
        else:
            pipe.delete(self._drained_key(region))
        pipe.incr(self._version_key)
        pipe.execute()

    def drained_regions(self, regions: Sequence[str]) -> set[str]:
        return {region for region, flags in self.flags(regions).items() if flags.drained}


class HealthSource(Protocol):
    """What the heartbeat asks of a region's follower (``VmiInformer``)."""

    @property
    def region(self) -> str: ...

    @property
    def healthy(self) -> bool: ...

    @property
    def stopped(self) -> bool: ...


class RegionHeartbeat:
    """A small daemon loop: every ``interval`` seconds, the regions whose follower is healthy
    are marked alive for ``HEARTBEAT_TTL_INTERVALS`` intervals. It ends when every follower
    has stopped (the worker is shutting down)."""

    def __init__(
        self, state: RedisRegionState, sources: Sequence[HealthSource], *, interval: float
    ) -> None:
        self._state = state
        self._sources = list(sources)
        self._interval = interval
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> list[str]:
        """One heartbeat now: the regions marked alive."""
        regions = sorted({s.region for s in self._sources if s.healthy and not s.stopped})
        self._state.heartbeat(regions, ttl_seconds=self._interval * HEARTBEAT_TTL_INTERVALS)
        return regions

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="region-heartbeat", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        while not self._stopping.is_set():
            if self._sources and all(s.stopped for s in self._sources):
                return
            try:
                self.beat()
            except redis.RedisError as exc:
                log.warning("region.heartbeat_failed", error=str(exc))
            self._stopping.wait(self._interval)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
