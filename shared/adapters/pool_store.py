"""Warm pools in Redis: what each pool holds, and the atomic steps that move an environment.

Per pool (``labvirt:pool:{<region>/<template>}:*``): ``ready`` (sorted set, env id -> ready at),
``inflight`` (env id -> reserved at), ``claimed`` (claimed environments whose VMIs are not yet
relabelled: env id -> claimed at), ``config`` (JSON), ``health`` (hash: failures, refill time,
last target) and a short ``lock``; the pool's demand is kept by ``PoolCounters``. Per
environment, in its pool: ``...:env:<id>``, a hash (state, region, template, token, times, VMs
as JSON); a hash rather than one JSON document, so a Lua script can flip its state without
decoding it. ``labvirt:pools:known`` lists the pools (``region/template``).

Every move that two processes could race on is one Lua script (``pool_scripts``). A pool's keys
share its hash tag, so each script stays in one hash slot of a Redis Cluster; an environment's
id alone does not name its pool, so a lookup by id asks every known pool (a few dozen keys).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Final, Protocol, cast

import redis

from shared.adapters import pool_scripts
from shared.adapters.pool_claims import PoolClaims
from shared.adapters.pool_counters import PoolCounters
from shared.adapters.pool_records import decode_environment, environment_key, pool_redis_key
from shared.domain.pools.config import PoolConfig, PoolKey
from shared.domain.pools.demand import Demand
from shared.domain.pools.environments import EnvironmentState, WarmEnvironment
from shared.domain.pools.plan import BootingEntry, PoolHealth, ReadyEntry
from shared.domain.pools.target import next_refill_estimate
from shared.domain.sessions import VmView

RETIRED_RECORD_SECONDS: Final = 3600


@dataclass(frozen=True, kw_only=True)
class PoolSnapshot:
    """What one pool holds at one moment."""

    ready: tuple[ReadyEntry, ...]
    booting: tuple[BootingEntry, ...]
    health: PoolHealth
    refill_seconds: float | None  # measured cold start (moving average); None until measured
    target: int | None  # what the prewarmer last aimed for


class PoolStore(Protocol):
    """The port the API, the prewarmer and the provisioner use (Redis; in memory for the
    sizing benchmark)."""

    def config(self, key: PoolKey, *, default: PoolConfig) -> PoolConfig: ...
    def set_config(self, key: PoolKey, config: PoolConfig) -> None: ...
    def globally_paused(self) -> bool: ...
    def set_globally_paused(self, paused: bool) -> None: ...
    def snapshot(self, key: PoolKey) -> PoolSnapshot: ...
    def set_target(self, key: PoolKey, target: int) -> None: ...
    def reserve(
        self,
        key: PoolKey,
        environments: Sequence[WarmEnvironment],
        *,
        ceiling: int,
        max_in_flight: int,
    ) -> list[WarmEnvironment]: ...
    def environment(self, env_id: str) -> WarmEnvironment | None: ...
    def mark_ready(
        self, key: PoolKey, env_id: str, *, vms: Sequence[VmView], at: float
    ) -> bool: ...
    def mark_unschedulable(self, env_id: str, *, unschedulable: bool) -> None: ...
    def retire(self, key: PoolKey, env_id: str) -> bool: ...
    def claim(
        self,
        key: PoolKey,
        *,
        session_id: str,
        at: float,
        record: bool = False,
        candidates: Sequence[str] | None = None,
    ) -> WarmEnvironment | None: ...
    def unbound_claims(self, key: PoolKey, *, before: float) -> list[WarmEnvironment]: ...
    def forget_claim(self, key: PoolKey, env_id: str) -> None: ...
    def record_success(self, key: PoolKey, *, refill_seconds: float) -> None: ...
    def record_failure(self, key: PoolKey, *, at: float) -> None: ...
    def record_claim(self, key: PoolKey, *, session_id: str, hit: bool, at: float) -> None: ...
    def fold_profile(self, key: PoolKey, *, now: float) -> int: ...
    def demand(self, key: PoolKey, *, now: float) -> Demand: ...
    def lock(self, key: PoolKey, *, seconds: float) -> AbstractContextManager[bool]: ...


class RedisPoolStore:
    def __init__(self, client: redis.Redis, *, prefix: str = "labvirt") -> None:
        self._redis = client
        self._prefix = prefix
        self.counters = PoolCounters(client, prefix=prefix)
        self.claims = PoolClaims(client, prefix=prefix, counters=self.counters)
        self._reserve = client.register_script(pool_scripts.RESERVE)
        self._mark_ready = client.register_script(pool_scripts.MARK_READY)
        self._retire = client.register_script(pool_scripts.RETIRE)
        self._mark_unschedulable = client.register_script(pool_scripts.MARK_UNSCHEDULABLE)
        self._unlock = client.register_script(pool_scripts.UNLOCK)

    # -- keys ---------------------------------------------------------------------------------

    def _pool(self, key: PoolKey, part: str) -> str:
        return pool_redis_key(self._prefix, key, part)

    def _pools(self, key: PoolKey, *parts: str) -> list[str]:
        return [self._pool(key, part) for part in parts]

    def _env(self, key: PoolKey, env_id: str) -> str:
        return environment_key(key, env_id, prefix=self._prefix)

    @property
    def _known(self) -> str:
        """Every pool that ever held an environment, as ``region/template``."""
        return f"{self._prefix}:pools:known"

    # -- configuration ------------------------------------------------------------------------

    def config(self, key: PoolKey, *, default: PoolConfig) -> PoolConfig:
        """The admin's configuration of the pool, or ``default`` (the template's)."""
        raw = self._redis.get(self._pool(key, "config"))
        return default if raw is None else PoolConfig.from_dict(json.loads(raw))

    def set_config(self, key: PoolKey, config: PoolConfig) -> None:
        pipe = self._redis.pipeline(transaction=False)  # two hash slots; each write stands alone
        pipe.set(self._pool(key, "config"), json.dumps(config.to_dict()))
        pipe.sadd(self._known, f"{key.region}/{key.template}")
        pipe.execute()

    def globally_paused(self) -> bool:
        return bool(self._redis.exists(f"{self._prefix}:pools:paused"))

    def set_globally_paused(self, paused: bool) -> None:
        if paused:
            self._redis.set(f"{self._prefix}:pools:paused", "1")
        else:
            self._redis.delete(f"{self._prefix}:pools:paused")

    # -- levels -------------------------------------------------------------------------------

    def snapshot(self, key: PoolKey) -> PoolSnapshot:
        pipe = self._redis.pipeline(transaction=False)
        pipe.zrange(self._pool(key, "ready"), 0, -1, withscores=True)
        pipe.zrange(self._pool(key, "inflight"), 0, -1, withscores=True)
        pipe.hgetall(self._pool(key, "health"))
        ready_raw, booting_raw, health_raw = pipe.execute()
        flags_pipe = self._redis.pipeline(transaction=False)
        for env_id, _ in booting_raw:
            flags_pipe.hget(self._env(key, _text(env_id)), "unschedulable")
        flags = flags_pipe.execute() if booting_raw else []
        health = {_text(k): _text(v) for k, v in health_raw.items()}
        return PoolSnapshot(
            ready=tuple(ReadyEntry(_text(e), float(s)) for e, s in ready_raw),
            booting=tuple(
                BootingEntry(_text(e), float(s), unschedulable=_text(flag or b"0") == "1")
                for (e, s), flag in zip(booting_raw, flags, strict=True)
            ),
            health=PoolHealth(
                failures=int(health.get("failures", 0)),
                last_failure_at=_optional_float(health.get("last_failure_at")),
            ),
            refill_seconds=_optional_float(health.get("refill_seconds")),
            target=None if "target" not in health else int(health["target"]),
        )

    def held_counts(self, keys: Sequence[PoolKey]) -> dict[PoolKey, tuple[int, int]]:
        """(ready, booting) environments of each pool, in one round trip: the pools' share of
        their region's load. Claimed ones are their sessions' and counted with them."""
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.zcard(self._pool(key, "ready"))
            pipe.zcard(self._pool(key, "inflight"))
        counts = [int(n) for n in pipe.execute()]
        return {key: (counts[2 * i], counts[2 * i + 1]) for i, key in enumerate(keys)}

    def set_target(self, key: PoolKey, target: int) -> None:
        self._redis.hset(self._pool(key, "health"), "target", str(target))

    # -- environments -------------------------------------------------------------------------

    def reserve(
        self,
        key: PoolKey,
        environments: Sequence[WarmEnvironment],
        *,
        ceiling: int,
        max_in_flight: int,
    ) -> list[WarmEnvironment]:
        """Add booting environments while the pool stays within ``ceiling`` (ready + booting)
        and ``max_in_flight`` (booting); checked and added in one step. Returns those added."""
        if not environments:
            return []
        now = environments[0].created_at
        keys = [self._pool(key, "ready"), self._pool(key, "inflight")]
        args: list[Any] = [ceiling, max_in_flight, repr(now), key.region, key.template]
        for env in environments:
            if (env.region, env.template) != (key.region, key.template):
                raise ValueError(f"environment {env.id} does not belong to pool {key}")
            keys.append(self._env(key, env.id))
            args += [env.id, env.token]
        # Known before it holds anything: the reconciler finds a pool's environments from here.
        self._redis.sadd(self._known, f"{key.region}/{key.template}")
        added = {_text(e) for e in self._reserve(keys=keys, args=args)}
        return [env for env in environments if env.id in added]

    def environment(self, env_id: str) -> WarmEnvironment | None:
        """The environment's record, from whichever known pool holds it."""
        pools = self._known_pools()
        pipe = self._redis.pipeline(transaction=False)
        for key in pools:
            pipe.hgetall(self._env(key, env_id))
        raw = next((r for r in pipe.execute() if r), None) if pools else None
        return decode_environment(env_id, raw) if raw else None

    def _known_pools(self, region: str | None = None) -> list[PoolKey]:
        members = sorted(_text(m) for m in cast(set[bytes], self._redis.smembers(self._known)))
        pools = [PoolKey(*member.rsplit("/", 1)) for member in members if "/" in member]
        return [p for p in pools if region is None or p.region == region]

    def mark_ready(self, key: PoolKey, env_id: str, *, vms: Sequence[VmView], at: float) -> bool:
        """Booting -> ready; False when the environment was retired meanwhile."""
        encoded = json.dumps([vm.to_dict() for vm in vms], separators=(",", ":"))
        return bool(
            self._mark_ready(
                keys=[*self._pools(key, "inflight", "ready"), self._env(key, env_id)],
                args=[env_id, repr(at), encoded],
            )
        )

    def mark_unschedulable(self, env_id: str, *, unschedulable: bool) -> None:
        env = self.environment(env_id)
        if env is not None:
            key = PoolKey(env.region, env.template)
            flag = "1" if unschedulable else "0"
            self._mark_unschedulable(keys=[self._env(key, env_id)], args=[flag])

    def retire(self, key: PoolKey, env_id: str) -> bool:
        """Take a booting or ready environment out of the pool; True for exactly one caller,
        which then removes its objects from the cluster."""
        return bool(
            self._retire(
                keys=[*self._pools(key, "ready", "inflight"), self._env(key, env_id)],
                args=[env_id, RETIRED_RECORD_SECONDS],
            )
        )

    def claim(
        self,
        key: PoolKey,
        *,
        session_id: str,
        at: float,
        record: bool = False,
        candidates: Sequence[str] | None = None,
    ) -> WarmEnvironment | None:
        """The oldest ready environment, now claimed by ``session_id`` in one script (no two
        sessions ever get the same one); None when none is ready (``pool_claims``).
        ``record``: count the claim as an arrival, a hit or a miss (``record_claim``);
        ``candidates``: the pool's oldest ready ids, if just read (``claims.queue_candidates``).
        """
        return self.claims.claim(
            key, session_id=session_id, at=at, record=record, candidates=candidates
        )

    def unbound_claims(self, key: PoolKey, *, before: float) -> list[WarmEnvironment]:
        """Claimed environments not yet relabelled for their session, claimed before ``before``."""
        ids = cast(
            list[bytes], self._redis.zrangebyscore(self._pool(key, "claimed"), "-inf", before)
        )
        found = []
        for raw_id in ids:
            env_id = _text(raw_id)
            raw = self._redis.hgetall(self._env(key, env_id))
            env = decode_environment(env_id, raw) if raw else None
            if env is None:
                self.forget_claim(key, env_id)
            else:
                found.append(env)
        return found

    def forget_claim(self, key: PoolKey, env_id: str) -> None:
        """Stop tracking a claim: its VMIs carry their session now, or it was dealt with."""
        self._redis.zrem(self._pool(key, "claimed"), env_id)

    # -- health -------------------------------------------------------------------------------

    def record_success(self, key: PoolKey, *, refill_seconds: float) -> None:
        health = self._pool(key, "health")

        def attempt(pipe: Any) -> None:
            previous = _optional_float(_maybe_text(pipe.hget(health, "refill_seconds")))
            estimate = next_refill_estimate(previous, refill_seconds)
            pipe.multi()
            pipe.hset(health, mapping={"failures": "0", "refill_seconds": repr(estimate)})
            pipe.hdel(health, "last_failure_at")

        self._redis.transaction(attempt, health)

    def record_failure(self, key: PoolKey, *, at: float) -> None:
        health = self._pool(key, "health")
        pipe = self._redis.pipeline()
        pipe.hincrby(health, "failures", 1)
        pipe.hset(health, "last_failure_at", repr(at))
        pipe.execute()

    # -- demand (kept by the counters) --------------------------------------------------------

    def record_claim(self, key: PoolKey, *, session_id: str, hit: bool, at: float) -> None:
        self.counters.record_claim(key, session_id=session_id, hit=hit, at=at)

    def fold_profile(self, key: PoolKey, *, now: float) -> int:
        return self.counters.fold_profile(key, now=now)

    def demand(self, key: PoolKey, *, now: float) -> Demand:
        return self.counters.demand(key, now=now)

    # -- what the reconciler asks (services.reaper.reconciler.PoolOwnership) ------------------

    def owned_environment_ids(self, region: str) -> set[str]:
        """Environments the pools of ``region`` hold: booting, ready, or claimed and not yet
        relabelled for their session (their VMIs still carry only the pool's label)."""
        pipe = self._redis.pipeline(transaction=False)
        for key in self._known_pools(region):
            for part in ("ready", "inflight", "claimed"):
                pipe.zrange(self._pool(key, part), 0, -1)
        return {_text(env_id) for ids in pipe.execute() for env_id in ids}

    def restore_environment(
        self, *, region: str, template: str, environment_id: str, created_at: float, ready: bool
    ) -> bool:
        """Take back a ready pool environment the cluster shows but Redis forgot (after a data
        loss). Its VM views are not known here: the claim's bind task fills them in. A booting
        one is not taken back (no task follows it any more); the reconciler deletes it."""
        if not ready:
            return False
        key = PoolKey(region, template)
        env_key = self._env(key, environment_id)
        self._redis.sadd(self._known, f"{region}/{template}")  # first, as in ``reserve``
        if not self._redis.hsetnx(env_key, "state", EnvironmentState.READY.value):
            state = self._redis.hget(env_key, "state")
            return state is not None and _text(state) != EnvironmentState.RETIRED.value
        pipe = self._redis.pipeline()
        pipe.hset(
            env_key,
            mapping={
                "region": region,
                "template": template,
                # No token: it was lost with the data (an absent one reads as "").
                "created_at": repr(created_at),
                "ready_at": repr(created_at),
                "unschedulable": "0",
            },
        )
        pipe.zadd(self._pool(key, "ready"), {environment_id: created_at})
        pipe.execute()
        return True

    # -- the prewarmer's lock -----------------------------------------------------------------

    @contextmanager
    def lock(self, key: PoolKey, *, seconds: float) -> Iterator[bool]:
        """True inside when this caller holds the pool's lock (expires after ``seconds``)."""
        name = self._pool(key, "lock")
        token = secrets.token_hex(8)
        acquired = bool(self._redis.set(name, token, nx=True, px=max(1, int(seconds * 1000))))
        try:
            yield acquired
        finally:
            if acquired:
                self._unlock(keys=[name], args=[token])


def _optional_float(value: str | None) -> float | None:
    return None if value is None else float(value)


def _maybe_text(value: bytes | str | None) -> str | None:
    return None if value is None else _text(value)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
