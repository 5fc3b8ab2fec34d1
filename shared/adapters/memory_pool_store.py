"""The pool store in memory: the same port as ``RedisPoolStore``, for the sizing benchmark.

A simulated week has a hundred thousand prewarmer ticks; Redis round trips would make the
benchmark take hours. The same contract tests run against both stores, so what the benchmark
measures is the behaviour of the real one. One lock makes every method atomic, as each Lua
script is in Redis.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from shared.adapters.pool_counters import ARRIVAL_RETENTION_SECONDS
from shared.adapters.pool_store import PoolSnapshot
from shared.domain.pools.config import PoolConfig, PoolKey
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
from shared.domain.pools.environments import EnvironmentState, WarmEnvironment
from shared.domain.pools.plan import BootingEntry, PoolHealth, ReadyEntry
from shared.domain.pools.target import next_refill_estimate
from shared.domain.sessions import VmView

_HOUR_MINUTES = 60


@dataclass
class _Pool:
    config: PoolConfig | None = None
    ready: dict[str, float] = field(default_factory=dict)
    inflight: dict[str, float] = field(default_factory=dict)
    claimed: dict[str, float] = field(default_factory=dict)
    health: PoolHealth = field(default_factory=PoolHealth)
    refill_seconds: float | None = None
    target: int | None = None
    arrivals: list[float] = field(default_factory=list)
    outcomes: dict[int, list[int]] = field(default_factory=dict)  # minute -> [hits, misses]
    profile: dict[int, SlotDemand] = field(default_factory=dict)
    folded: int | None = None
    locked: bool = False


class MemoryPoolStore:
    def __init__(self) -> None:
        self._pools: dict[PoolKey, _Pool] = {}
        self._environments: dict[str, WarmEnvironment] = {}
        self._paused = False
        self._mutex = threading.RLock()

    def _pool(self, key: PoolKey) -> _Pool:
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool()
        return pool

    def config(self, key: PoolKey, *, default: PoolConfig) -> PoolConfig:
        with self._mutex:
            return self._pool(key).config or default

    def set_config(self, key: PoolKey, config: PoolConfig) -> None:
        with self._mutex:
            self._pool(key).config = config

    def globally_paused(self) -> bool:
        return self._paused

    def set_globally_paused(self, paused: bool) -> None:
        self._paused = paused

    def snapshot(self, key: PoolKey) -> PoolSnapshot:
        with self._mutex:
            pool = self._pool(key)
            return PoolSnapshot(
                ready=tuple(
                    ReadyEntry(e, t) for e, t in sorted(pool.ready.items(), key=lambda i: i[1])
                ),
                booting=tuple(
                    BootingEntry(e, t, unschedulable=self._environments[e].unschedulable)
                    for e, t in sorted(pool.inflight.items(), key=lambda i: i[1])
                ),
                health=pool.health,
                refill_seconds=pool.refill_seconds,
                target=pool.target,
            )

    def set_target(self, key: PoolKey, target: int) -> None:
        with self._mutex:
            self._pool(key).target = target

    def reserve(
        self,
        key: PoolKey,
        environments: Sequence[WarmEnvironment],
        *,
        ceiling: int,
        max_in_flight: int,
    ) -> list[WarmEnvironment]:
        with self._mutex:
            pool = self._pool(key)
            room = min(
                ceiling - len(pool.ready) - len(pool.inflight), max_in_flight - len(pool.inflight)
            )
            added = []
            for env in environments:
                if room <= 0:
                    break
                if (env.region, env.template) != (key.region, key.template):
                    raise ValueError(f"environment {env.id} does not belong to pool {key}")
                if env.id in self._environments:
                    continue
                booting = replace(env, state=EnvironmentState.BOOTING)
                self._environments[env.id] = booting
                pool.inflight[env.id] = env.created_at
                added.append(booting)
                room -= 1
            return added

    def environment(self, env_id: str) -> WarmEnvironment | None:
        with self._mutex:
            return self._environments.get(env_id)

    def mark_ready(self, key: PoolKey, env_id: str, *, vms: Sequence[VmView], at: float) -> bool:
        with self._mutex:
            env = self._environments.get(env_id)
            pool = self._pool(key)
            if env is None or env.state is not EnvironmentState.BOOTING:
                return False
            if pool.inflight.pop(env_id, None) is None:
                return False
            self._environments[env_id] = replace(env.ready(at=at, vms=vms), unschedulable=False)
            pool.ready[env_id] = at
            return True

    def mark_unschedulable(self, env_id: str, *, unschedulable: bool) -> None:
        with self._mutex:
            env = self._environments.get(env_id)
            if env is not None and env.state is EnvironmentState.BOOTING:
                self._environments[env_id] = replace(env, unschedulable=unschedulable)

    def retire(self, key: PoolKey, env_id: str) -> bool:
        with self._mutex:
            pool = self._pool(key)
            removed = (pool.ready.pop(env_id, None) is not None) + (
                pool.inflight.pop(env_id, None) is not None
            )
            env = self._environments.get(env_id)
            if env is not None and env.state in (EnvironmentState.BOOTING, EnvironmentState.READY):
                self._environments[env_id] = env.moved(EnvironmentState.RETIRED)
                return True
            return env is None and removed > 0

    def claim(
        self,
        key: PoolKey,
        *,
        session_id: str,
        at: float,
        record: bool = False,
        candidates: Sequence[str] | None = None,  # noqa: ARG002 - Redis's round trip saved
    ) -> WarmEnvironment | None:
        claimed = self._claim(key, session_id=session_id, at=at)
        if record:
            self.record_claim(key, session_id=session_id, hit=claimed is not None, at=at)
        return claimed

    def _claim(self, key: PoolKey, *, session_id: str, at: float) -> WarmEnvironment | None:
        with self._mutex:
            pool = self._pool(key)
            while pool.ready:
                env_id = min(pool.ready, key=lambda e: (pool.ready[e], e))
                del pool.ready[env_id]
                env = self._environments.get(env_id)
                if env is None or env.state is not EnvironmentState.READY:
                    continue
                claimed = env.claimed(session_id=session_id, at=at)
                self._environments[env_id] = claimed
                pool.claimed[env_id] = at
                return claimed
            return None

    def unbound_claims(self, key: PoolKey, *, before: float) -> list[WarmEnvironment]:
        with self._mutex:
            pool = self._pool(key)
            return [self._environments[e] for e, t in pool.claimed.items() if t <= before]

    def forget_claim(self, key: PoolKey, env_id: str) -> None:
        with self._mutex:
            self._pool(key).claimed.pop(env_id, None)

    def record_success(self, key: PoolKey, *, refill_seconds: float) -> None:
        with self._mutex:
            pool = self._pool(key)
            pool.refill_seconds = next_refill_estimate(pool.refill_seconds, refill_seconds)
            pool.health = PoolHealth()

    def record_failure(self, key: PoolKey, *, at: float) -> None:
        with self._mutex:
            pool = self._pool(key)
            pool.health = PoolHealth(failures=pool.health.failures + 1, last_failure_at=at)

    def record_claim(
        self,
        key: PoolKey,
        *,
        session_id: str,  # noqa: ARG002 - Redis keeps it to tell arrivals apart; a list needs not
        hit: bool,
        at: float,
    ) -> None:
        with self._mutex:
            pool = self._pool(key)
            pool.arrivals.append(at)
            if pool.arrivals[0] <= at - ARRIVAL_RETENTION_SECONDS:
                pool.arrivals = [t for t in pool.arrivals if t > at - ARRIVAL_RETENTION_SECONDS]
            minute = int(at // 60)
            counts = pool.outcomes.setdefault(minute, [0, 0])
            counts[0 if hit else 1] += 1
            if len(pool.outcomes) > 2 * _HOUR_MINUTES:
                for old in [m for m in pool.outcomes if m <= minute - 2 * _HOUR_MINUTES]:
                    del pool.outcomes[old]

    def fold_profile(self, key: PoolKey, *, now: float) -> int:
        with self._mutex:
            pool = self._pool(key)
            current = absolute_slot(now)
            if pool.folded is not None and pool.folded >= current - 1:
                return 0
            oldest = absolute_slot(now - ARRIVAL_RETENTION_SECONDS) + 1
            first = max(oldest, pool.folded + 1 if pool.folded is not None else current - 1)
            folds = 0
            for slot in range(first, current):
                start, end = slot * SLOT_SECONDS, (slot + 1) * SLOT_SECONDS
                claims, peak = summarise_slot(
                    (t for t in pool.arrivals if start - PEAK_WINDOW_SECONDS <= t < end),
                    start=start,
                )
                week_slot = slot_of_week(slot)
                pool.profile[week_slot] = fold_slot(
                    pool.profile.get(week_slot), claims=claims, peak=peak
                )
                folds += 1
            pool.folded = current - 1
            return folds

    def demand(self, key: PoolKey, *, now: float) -> Demand:
        with self._mutex:
            pool = self._pool(key)
            minute = int(now // 60)
            hits = misses = 0
            for m in range(minute - _HOUR_MINUTES + 1, minute + 1):
                counts = pool.outcomes.get(m)
                if counts is not None:
                    hits += counts[0]
                    misses += counts[1]
            return Demand(
                arrivals=tuple(t for t in pool.arrivals if now - RECENT_WINDOW_SECONDS <= t <= now),
                profile=MappingProxyType(pool.profile),  # read-only, not copied: ticks are hot
                claims_last_hour=hits + misses,
                misses_last_hour=misses,
            )

    @contextmanager
    def lock(self, key: PoolKey, *, seconds: float) -> Iterator[bool]:  # noqa: ARG002
        with self._mutex:
            pool = self._pool(key)
            acquired = not pool.locked
            pool.locked = True
        try:
            yield acquired
        finally:
            if acquired:
                with self._mutex:
                    pool.locked = False
