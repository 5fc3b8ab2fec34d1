"""Counters of warm-pool claims in Redis: hits and misses per minute, and running totals.

The metrics hooks of the pools: the prewarmer reads the last hour to correct its sizing, the
admin API shows the hit rate, and the observability work exports the totals. Per-minute
counters expire on their own, so nothing has to trim them.
"""

from __future__ import annotations

from typing import Any, Final

import redis

from shared.domain.pools import PoolKey

MINUTE_RETENTION_SECONDS: Final = 2 * 3600
HOUR_MINUTES: Final = 60


class PoolCounters:
    def __init__(self, client: redis.Redis, *, prefix: str = "labvirt") -> None:
        self._redis = client
        self._prefix = prefix

    def _minute_key(self, key: PoolKey, minute: int) -> str:
        return f"{self._prefix}:pool:{key.region}:{key.template}:outcomes:{minute}"

    def _totals_key(self, key: PoolKey) -> str:
        return f"{self._prefix}:pool:{key.region}:{key.template}:totals"

    def count(self, pipe: Any, key: PoolKey, *, hit: bool, at: float) -> None:
        """Queue the counting of one claim on ``pipe`` (a pipeline of the caller's)."""
        field = "hits" if hit else "misses"
        minute_key = self._minute_key(key, int(at // 60))
        pipe.hincrby(minute_key, field, 1)
        pipe.expire(minute_key, MINUTE_RETENTION_SECONDS)
        pipe.hincrby(self._totals_key(key), field, 1)

    def last_hour(self, key: PoolKey, *, now: float) -> tuple[int, int]:
        """Claims and misses in the last hour (to the minute)."""
        current = int(now // 60)
        pipe = self._redis.pipeline(transaction=False)
        for minute in range(current - HOUR_MINUTES + 1, current + 1):
            pipe.hmget(self._minute_key(key, minute), "hits", "misses")
        hits = misses = 0
        for minute_hits, minute_misses in pipe.execute():
            hits += int(minute_hits or 0)
            misses += int(minute_misses or 0)
        return hits + misses, misses

    def totals(self, key: PoolKey) -> dict[str, int]:
        """Hits and misses since the counters began (monotonic, for exporters)."""
        raw = self._redis.hgetall(self._totals_key(key))
        values = {_text(k): int(v) for k, v in raw.items()}
        return {"hits": values.get("hits", 0), "misses": values.get("misses", 0)}


def hit_rate(claims: int, misses: int) -> float | None:
    """The share of claims that found a warm environment; None without claims."""
    return None if claims == 0 else (claims - misses) / claims


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
