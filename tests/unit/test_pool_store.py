"""The pool store's contract, run against Redis (the real server: its Lua scripts are the point)
and against the in-memory store the sizing benchmark uses: same answers, same atomicity."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from shared.adapters.memory_pool_store import MemoryPoolStore
from shared.adapters.pool_store import PoolStore, RedisPoolStore
from shared.domain.pools.config import PoolConfig, PoolKey, PoolMode
from shared.domain.pools.demand import SLOT_SECONDS, absolute_slot, slot_of_week
from shared.domain.pools.environments import EnvironmentState, WarmEnvironment, new_warm_environment
from shared.domain.sessions import VmView

NOW = 1_700_000_000.0
KEY = PoolKey("local", "ubuntu")
VMS = [VmView(name="ubuntu", hostname="ubuntu", ip="10.244.1.2", phase="Running", ready=True)]


def redis_store(redis_url: str) -> tuple[RedisPoolStore, Callable[[], None]]:
    client = redis.Redis.from_url(redis_url)
    prefix = f"test-pools-{uuid.uuid4().hex[:8]}"

    def cleanup() -> None:
        keys = list(client.scan_iter(f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()

    return RedisPoolStore(client, prefix=prefix), cleanup


def make_store(kind: str, redis_url: str) -> tuple[PoolStore, Callable[[], None]]:
    if kind == "redis":
        return redis_store(redis_url)
    return MemoryPoolStore(), lambda: None


@pytest.fixture(params=["redis", "memory"])
def store(request: pytest.FixtureRequest, redis_url: str) -> Iterator[PoolStore]:
    made, cleanup = make_store(request.param, redis_url)
    try:
        yield made
    finally:
        cleanup()


def fresh(n: int, *, now: float = NOW, key: PoolKey = KEY) -> list[WarmEnvironment]:
    return [new_warm_environment(key=key, now=now) for _ in range(n)]


def fill(store: PoolStore, n: int, *, now: float = NOW) -> list[str]:
    """``n`` ready environments, ready one second apart (the first is the oldest)."""
    envs = store.reserve(KEY, fresh(n, now=now), ceiling=n, max_in_flight=n)
    for offset, env in enumerate(envs):
        assert store.mark_ready(KEY, env.id, vms=VMS, at=now + offset)
    return [env.id for env in envs]


def test_config_defaults_to_the_templates_until_set(store: PoolStore) -> None:
    default = PoolConfig(size=2)
    assert store.config(KEY, default=default) == default
    adaptive = PoolConfig(mode=PoolMode.ADAPTIVE, min_size=1, max_size=7, hit_rate=0.9)
    store.set_config(KEY, adaptive)
    assert store.config(KEY, default=default) == adaptive
    assert store.config(PoolKey("eu", "ubuntu"), default=default) == default
    assert store.globally_paused() is False
    store.set_globally_paused(True)
    assert store.globally_paused() is True
    store.set_globally_paused(False)
    assert store.globally_paused() is False


def test_reserve_stays_within_the_ceiling_and_in_flight_bound(store: PoolStore) -> None:
    added = store.reserve(KEY, fresh(5), ceiling=3, max_in_flight=10)
    assert len(added) == 3
    assert store.reserve(KEY, fresh(5), ceiling=3, max_in_flight=10) == []
    assert len(store.reserve(KEY, fresh(5), ceiling=10, max_in_flight=4)) == 1
    snapshot = store.snapshot(KEY)
    assert len(snapshot.booting) == 4
    assert snapshot.ready == ()
    env = store.environment(added[0].id)
    assert env is not None
    assert (env.state, env.token, env.created_at) == (
        EnvironmentState.BOOTING,
        added[0].token,
        NOW,
    )


def test_an_environment_is_reserved_once(store: PoolStore) -> None:
    [env] = fresh(1)
    assert store.reserve(KEY, [env], ceiling=5, max_in_flight=5) == [env]
    assert store.reserve(KEY, [env], ceiling=5, max_in_flight=5) == []
    assert len(store.snapshot(KEY).booting) == 1


def test_mark_ready_moves_booting_to_ready_once(store: PoolStore) -> None:
    [env] = store.reserve(KEY, fresh(1), ceiling=1, max_in_flight=1)
    assert store.mark_ready(KEY, env.id, vms=VMS, at=NOW + 20)
    assert not store.mark_ready(KEY, env.id, vms=VMS, at=NOW + 21)
    snapshot = store.snapshot(KEY)
    assert [(r.env_id, r.ready_at) for r in snapshot.ready] == [(env.id, NOW + 20)]
    assert snapshot.booting == ()
    ready = store.environment(env.id)
    assert ready is not None
    assert ready.state is EnvironmentState.READY
    assert list(ready.vms) == VMS


def test_a_retired_boot_never_becomes_ready(store: PoolStore) -> None:
    [env] = store.reserve(KEY, fresh(1), ceiling=1, max_in_flight=1)
    assert store.retire(KEY, env.id)
    assert not store.retire(KEY, env.id)
    assert not store.mark_ready(KEY, env.id, vms=VMS, at=NOW)
    snapshot = store.snapshot(KEY)
    assert (snapshot.ready, snapshot.booting) == ((), ())


def test_claims_take_the_oldest_ready_environment(store: PoolStore) -> None:
    ids = fill(store, 3)
    first = store.claim(KEY, session_id="s-1", at=NOW + 100)
    assert first is not None
    assert first.id == ids[0]
    assert (first.state, first.session_id, first.claimed_at) == (
        EnvironmentState.CLAIMED,
        "s-1",
        NOW + 100,
    )
    assert list(first.vms) == VMS
    assert [r.env_id for r in store.snapshot(KEY).ready] == ids[1:]
    assert not store.retire(KEY, first.id)  # a claimed environment is its session's


def test_a_claim_on_an_empty_pool_misses(store: PoolStore) -> None:
    assert store.claim(KEY, session_id="s-1", at=NOW) is None
    store.reserve(KEY, fresh(2), ceiling=2, max_in_flight=2)
    assert store.claim(KEY, session_id="s-1", at=NOW) is None  # booting is not ready


def test_claimed_environments_wait_for_their_bind(store: PoolStore) -> None:
    fill(store, 2)
    claimed = store.claim(KEY, session_id="s-1", at=NOW + 10)
    assert claimed is not None
    assert store.unbound_claims(KEY, before=NOW + 5) == []
    [unbound] = store.unbound_claims(KEY, before=NOW + 10)
    assert (unbound.id, unbound.session_id) == (claimed.id, "s-1")
    store.forget_claim(KEY, claimed.id)
    assert store.unbound_claims(KEY, before=NOW + 100) == []


def test_concurrent_claims_hand_each_environment_to_one_session(store: PoolStore) -> None:
    ids = set(fill(store, 20))
    sessions = [f"s-{i}" for i in range(60)]
    barrier = threading.Barrier(len(sessions))

    def claim(session_id: str) -> tuple[str, str | None]:
        barrier.wait()
        env = store.claim(KEY, session_id=session_id, at=NOW + 100)
        return session_id, None if env is None else env.id

    with ThreadPoolExecutor(max_workers=len(sessions)) as executor:
        results = list(executor.map(claim, sessions))
    won = [env_id for _, env_id in results if env_id is not None]
    assert sorted(won) == sorted(ids)  # every one claimed, none twice
    for session_id, env_id in results:
        if env_id is not None:
            env = store.environment(env_id)
            assert env is not None
            assert env.session_id == session_id


def test_concurrent_reservations_never_pass_the_ceiling(store: PoolStore) -> None:
    barrier = threading.Barrier(8)

    def reserve(_: int) -> int:
        barrier.wait()
        return len(store.reserve(KEY, fresh(5), ceiling=12, max_in_flight=50))

    with ThreadPoolExecutor(max_workers=8) as executor:
        assert sum(executor.map(reserve, range(8))) == 12
    assert len(store.snapshot(KEY).booting) == 12


def test_unschedulable_flags_only_booting_environments(store: PoolStore) -> None:
    [env] = store.reserve(KEY, fresh(1), ceiling=1, max_in_flight=1)
    store.mark_unschedulable(env.id, unschedulable=True)
    assert [b.unschedulable for b in store.snapshot(KEY).booting] == [True]
    store.mark_unschedulable(env.id, unschedulable=False)
    assert [b.unschedulable for b in store.snapshot(KEY).booting] == [False]
    store.mark_unschedulable(env.id, unschedulable=True)
    assert store.mark_ready(KEY, env.id, vms=VMS, at=NOW)
    store.mark_unschedulable(env.id, unschedulable=True)
    ready = store.environment(env.id)
    assert ready is not None
    assert ready.unschedulable is False


def test_health_counts_failures_and_learns_the_refill_time(store: PoolStore) -> None:
    assert store.snapshot(KEY).health.failures == 0
    store.record_failure(KEY, at=NOW)
    store.record_failure(KEY, at=NOW + 5)
    health = store.snapshot(KEY).health
    assert (health.failures, health.last_failure_at) == (2, NOW + 5)
    store.record_success(KEY, refill_seconds=30)
    store.record_success(KEY, refill_seconds=40)
    snapshot = store.snapshot(KEY)
    assert snapshot.health.failures == 0
    assert snapshot.health.last_failure_at is None
    assert 30 < (snapshot.refill_seconds or 0) < 40
    store.set_target(KEY, 7)
    assert store.snapshot(KEY).target == 7


def test_demand_holds_recent_claims_and_the_last_hours_outcomes(store: PoolStore) -> None:
    for i in range(10):
        store.record_claim(KEY, session_id=f"s-{i}", hit=i % 3 != 0, at=NOW - 60 * i)
    demand = store.demand(KEY, now=NOW)
    assert sorted(demand.arrivals) == sorted(NOW - 60 * i for i in range(10) if 60 * i <= 900)
    assert (demand.claims_last_hour, demand.misses_last_hour) == (10, 4)
    later = store.demand(KEY, now=NOW + 3600)
    assert (later.arrivals, later.claims_last_hour) == ((), 0)


def test_finished_slots_fold_into_the_profile_exactly_once(store: PoolStore) -> None:
    start = NOW - NOW % SLOT_SECONDS
    store.fold_profile(KEY, now=start)  # the fold's starting point
    for i in range(30):
        store.record_claim(KEY, session_id=f"s-{i}", hit=False, at=start + 100 + i)
    assert store.fold_profile(KEY, now=start + SLOT_SECONDS / 2) == 0  # not finished yet
    assert store.fold_profile(KEY, now=start + SLOT_SECONDS + 1) == 1
    assert store.fold_profile(KEY, now=start + SLOT_SECONDS + 2) == 0
    profile = store.demand(KEY, now=start + SLOT_SECONDS + 2).profile
    slot = profile[slot_of_week(absolute_slot(start))]
    assert slot.peak == 30
    assert slot.rate == pytest.approx(30 / SLOT_SECONDS)
    assert slot.is_burst


def test_the_pool_lock_admits_one_holder(store: PoolStore) -> None:
    with store.lock(KEY, seconds=10) as first:
        assert first
        with store.lock(KEY, seconds=10) as second:
            assert not second
        with store.lock(PoolKey("eu", "ubuntu"), seconds=10) as other:
            assert other
    with store.lock(KEY, seconds=10) as again:
        assert again


# -- Redis only: what the reconciler asks, and the counters ----------------------------------


def test_redis_store_tells_the_reconciler_what_the_pools_own(redis_url: str) -> None:
    store, cleanup = redis_store(redis_url)
    try:
        ready = fill(store, 2)
        [booting] = store.reserve(KEY, fresh(1), ceiling=3, max_in_flight=3)
        claimed = store.claim(KEY, session_id="s-1", at=NOW)
        assert claimed is not None
        other = PoolKey("eu", "ubuntu")
        store.reserve(other, fresh(1, key=other), ceiling=1, max_in_flight=1)
        assert store.owned_environment_ids("local") == {*ready, booting.id}
        store.forget_claim(KEY, claimed.id)
        assert store.owned_environment_ids("local") == {ready[1], booting.id}
        # After a data loss: a ready environment found in the cluster is taken back.
        assert store.restore_environment(
            region="local", template="ubuntu", environment_id="abc123", created_at=NOW, ready=True
        )
        assert "abc123" in store.owned_environment_ids("local")
        assert not store.restore_environment(
            region="local", template="ubuntu", environment_id="def456", created_at=NOW, ready=False
        )
        assert store.restore_environment(
            region="local", template="ubuntu", environment_id="abc123", created_at=NOW, ready=True
        )
        taken = store.claim(KEY, session_id="s-2", at=NOW + 1)
        assert taken is not None
        assert taken.id == "abc123"  # the oldest: ready since its creation
    finally:
        cleanup()


def test_redis_counters_total_hits_and_misses(redis_url: str) -> None:
    store, cleanup = redis_store(redis_url)
    try:
        for i in range(5):
            store.record_claim(KEY, session_id=f"s-{i}", hit=i < 3, at=NOW + i)
        assert store.counters.totals(KEY) == {"hits": 3, "misses": 2}
        assert store.counters.last_hour(KEY, now=NOW + 10) == (5, 2)
    finally:
        cleanup()


# -- the pool's state machine, against both stores -------------------------------------------


class PoolMachine(RuleBasedStateMachine):
    """Random reserve / ready / retire / claim / bind sequences; the store must agree with a
    plain model, never hand an environment to two sessions, nor exceed a reservation's ceiling."""

    factory: Callable[[], tuple[PoolStore, Callable[[], None]]]

    # Each reservation's ids; a drawn list may hold environments in any state by then.
    reserved = Bundle("reserved")

    def __init__(self) -> None:
        super().__init__()
        self.store, self.cleanup = type(self).factory()
        self.model: dict[str, EnvironmentState] = {}
        self.owner: dict[str, str] = {}
        self.sessions = 0
        self.clock = NOW

    def teardown(self) -> None:
        self.cleanup()

    def _tick(self) -> float:
        self.clock += 1
        return self.clock

    @rule(target=reserved, n=st.integers(1, 4), ceiling=st.integers(0, 8))
    def reserve(self, n: int, ceiling: int) -> list[str]:
        held = sum(
            1
            for s in self.model.values()
            if s in (EnvironmentState.BOOTING, EnvironmentState.READY)
        )
        booting = sum(1 for s in self.model.values() if s is EnvironmentState.BOOTING)
        added = self.store.reserve(
            KEY, fresh(n, now=self._tick()), ceiling=ceiling, max_in_flight=6
        )
        assert len(added) == max(0, min(n, ceiling - held, 6 - booting))
        for env in added:
            self.model[env.id] = EnvironmentState.BOOTING
        return [env.id for env in added]

    @rule(env_ids=reserved)
    def mark_ready(self, env_ids: list[str]) -> None:
        for env_id in env_ids:
            moved = self.store.mark_ready(KEY, env_id, vms=VMS, at=self._tick())
            assert moved is (self.model[env_id] is EnvironmentState.BOOTING)
            if moved:
                self.model[env_id] = EnvironmentState.READY

    @rule(env_ids=reserved, which=st.integers(0, 3))
    def retire(self, env_ids: list[str], which: int) -> None:
        if not env_ids:
            return
        env_id = env_ids[which % len(env_ids)]
        retired = self.store.retire(KEY, env_id)
        assert retired is (self.model[env_id] in (EnvironmentState.BOOTING, EnvironmentState.READY))
        if retired:
            self.model[env_id] = EnvironmentState.RETIRED

    @rule()
    def claim(self) -> None:
        self.sessions += 1
        session_id = f"s-{self.sessions}"
        ready = [e for e, s in self.model.items() if s is EnvironmentState.READY]
        env = self.store.claim(KEY, session_id=session_id, at=self._tick())
        assert (env is None) == (not ready)
        if env is not None:
            assert self.model[env.id] is EnvironmentState.READY
            assert env.id not in self.owner
            self.owner[env.id] = session_id
            self.model[env.id] = EnvironmentState.CLAIMED
            self.store.forget_claim(KEY, env.id)

    @invariant()
    def store_agrees_with_the_model(self) -> None:
        snapshot = self.store.snapshot(KEY)
        assert {r.env_id for r in snapshot.ready} == {
            e for e, s in self.model.items() if s is EnvironmentState.READY
        }
        assert {b.env_id for b in snapshot.booting} == {
            e for e, s in self.model.items() if s is EnvironmentState.BOOTING
        }
        assert len(snapshot.ready) + len(snapshot.booting) <= 8
        for env_id, session_id in self.owner.items():
            env = self.store.environment(env_id)
            assert env is not None
            assert (env.state, env.session_id) == (EnvironmentState.CLAIMED, session_id)


@pytest.mark.parametrize("kind", ["redis", "memory"])
def test_pool_state_machine(kind: str, redis_url: str) -> None:
    class Machine(PoolMachine):
        factory = staticmethod(lambda: make_store(kind, redis_url))

    run_state_machine_as_test(
        Machine, settings=settings(max_examples=40, stateful_step_count=25, deadline=None)
    )
