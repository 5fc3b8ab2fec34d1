"""Demand on warm pools in Redis: claim arrivals, hits and misses per minute, the week profile.

The metrics hooks of the pools: the prewarmer sizes adaptive pools from recent arrivals and the
time-of-week profile folded from them, and reads the last hour to correct its sizing; the admin
API shows the hit rate, and the observability work exports the totals.

Per pool (``labvirt:pool:{<region>/<template>}:*``): ``arrivals`` (sorted set, session id -> claim
time), ``outcomes:{minute}`` (hash: hits, misses), ``totals`` (hash: hits, misses) and
``profile`` (hash: slot of the week -> JSON, and the last slot ``folded``). Per-minute counters
expire on their own, so nothing has to trim them.
"""

from __future__ import annotations

import json
from typing import Any, Final, cast

import redis

from shared.adapters.pool_records import pool_redis_key
from shared.domain.pools.config import PoolKey
from shared.domain.pools.demand import (
    PEAK_WINDOW_SECONDS,
    RECENT_WINDOW_SECONDS,
    SLOT_SECONDS,
    Demand,
    SlotDemand,
    absolute_slot,
    fold_slot,
    slot_of_week,
    summarise_slot,
)

# Claims arrivals are kept this long: the recent window, and time to fold a finished slot.
ARRIVAL_RETENTION_SECONDS: Final = 3600
MINUTE_RETENTION_SECONDS: Final = 2 * 3600
HOUR_MINUTES: Final = 60


class PoolCounters:
    def __init__(self, client: redis.Redis, *, prefix: str = "labvirt") -> None:
        self._redis = client
        self._prefix = prefix

    def _pool(self, key: PoolKey, part: str) -> str:
        return pool_redis_key(self._prefix, key, part)

    def _minute_key(self, key: PoolKey, minute: int) -> str:
        return self._pool(key, f"outcomes:{minute}")

    def claim_keys(self, key: PoolKey, *, at: float) -> list[str]:
        """Where a claim at ``at`` is counted: the arrivals, the minute's outcomes, the totals
        (the claim script counts a hit in the same step, ``pool_scripts.CLAIM``)."""
        return [
            self._pool(key, "arrivals"),
            self._minute_key(key, int(at // 60)),
            self._pool(key, "totals"),
        ]

    def claim_args(self, *, at: float) -> list[str | int]:
        """What the claim script needs to count a hit as ``record_claim`` does: arrivals
        before this go, the arrivals' and the minute's time to live."""
        return [
            repr(at - ARRIVAL_RETENTION_SECONDS),
            ARRIVAL_RETENTION_SECONDS,
            MINUTE_RETENTION_SECONDS,
        ]

    def record_claim(self, key: PoolKey, *, session_id: str, hit: bool, at: float) -> None:
        """One create asked this pool: its arrival (for sizing) and whether it was warm."""
        arrivals, minute_key, _ = self.claim_keys(key, at=at)
        outcome = "hits" if hit else "misses"
        pipe = self._redis.pipeline(transaction=False)
        pipe.zadd(arrivals, {session_id: at})
        pipe.zremrangebyscore(arrivals, "-inf", at - ARRIVAL_RETENTION_SECONDS)
        pipe.expire(arrivals, ARRIVAL_RETENTION_SECONDS)
        pipe.hincrby(minute_key, outcome, 1)
        pipe.expire(minute_key, MINUTE_RETENTION_SECONDS)
        pipe.hincrby(self._pool(key, "totals"), outcome, 1)
        pipe.execute()

    def fold_profile(self, key: PoolKey, *, now: float) -> int:
        """Fold every finished slot not folded yet into the week profile, exactly once (a
        WATCHed transaction); returns how many slots were folded."""
        profile = self._pool(key, "profile")
        arrivals = self._pool(key, "arrivals")
        current = absolute_slot(now)
        # Slots whose arrivals may already be trimmed are skipped, not folded as empty.
        oldest = absolute_slot(now - ARRIVAL_RETENTION_SECONDS) + 1
        folded = self._redis.hget(profile, "folded")
        if folded is not None and int(folded) >= current - 1:
            return 0  # the usual tick: nothing finished since the last fold

        def attempt(pipe: Any) -> int:
            folded_raw = pipe.hget(profile, "folded")
            first = max(oldest, int(folded_raw) + 1 if folded_raw is not None else current - 1)
            updates: dict[str, str] = {}
            for slot in range(first, current):
                start = slot * SLOT_SECONDS
                times = [
                    float(score)
                    for _, score in pipe.zrangebyscore(
                        arrivals,
                        start - PEAK_WINDOW_SECONDS,
                        f"({start + SLOT_SECONDS}",
                        withscores=True,
                    )
                ]
                claims, peak = summarise_slot(times, start=start)
                field = str(slot_of_week(slot))
                previous_raw = pipe.hget(profile, field)
                previous = (
                    None if previous_raw is None else SlotDemand.from_dict(json.loads(previous_raw))
                )
                updates[field] = json.dumps(fold_slot(previous, claims=claims, peak=peak).to_dict())
            pipe.multi()
            updates["folded"] = str(current - 1)
            pipe.hset(profile, mapping=updates)
            return len(updates) - 1

        folds = self._redis.transaction(attempt, profile, value_from_callable=True)  # type: ignore[arg-type]
        return cast(int, folds)

    def demand(self, key: PoolKey, *, now: float) -> Demand:
        """Recent arrivals, the week profile and the last hour's outcomes, for sizing."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.zrangebyscore(
            self._pool(key, "arrivals"), now - RECENT_WINDOW_SECONDS, now, withscores=True
        )
        pipe.hgetall(self._pool(key, "profile"))
        arrivals_raw, profile_raw = pipe.execute()
        profile = {
            int(_text(slot)): SlotDemand.from_dict(json.loads(value))
            for slot, value in profile_raw.items()
            if _text(slot) != "folded"
        }
        claims, misses = self.last_hour(key, now=now)
        return Demand(
            arrivals=tuple(float(score) for _, score in arrivals_raw),
            profile=profile,
            claims_last_hour=claims,
            misses_last_hour=misses,
        )

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
        raw = self._redis.hgetall(self._pool(key, "totals"))
        values = {_text(k): int(v) for k, v in raw.items()}
        return {"hits": values.get("hits", 0), "misses": values.get("misses", 0)}


def hit_rate(claims: int, misses: int) -> float | None:
    """The share of claims that found a warm environment; None without claims."""
    return None if claims == 0 else (claims - misses) / claims


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
