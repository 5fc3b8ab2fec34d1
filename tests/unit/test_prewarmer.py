"""The prewarmer's tick on a fake clock: what it creates, retires and enqueues, alone and with
a second prewarmer racing it, and how an adaptive pool follows a class of learners."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from services.prewarmer.prewarmer import (
    UNBOUND_CLAIM_GRACE_SECONDS,
    Prewarmer,
    PrewarmSettings,
)
from shared.adapters.memory_pool_store import MemoryPoolStore
from shared.adapters.pool_store import PoolStore, RedisPoolStore
from shared.adapters.template_files import load_templates
from shared.domain.pools.config import PoolConfig, PoolKey, PoolMode
from shared.domain.pools.demand import SLOT_SECONDS, WEEK_SECONDS
from shared.domain.pools.environments import WarmEnvironment
from shared.domain.pools.target import LEAD_SECONDS
from shared.domain.sessions import VmView
from shared.jobs import BIND_ENVIRONMENT, PREWARM_ENVIRONMENT, RETIRE_ENVIRONMENT, check_payload

START = 1_700_000_000.0
TEMPLATES = load_templates(None)
UBUNTU = PoolKey("local", "ubuntu")
KUBERNETES = PoolKey("local", "kubernetes")
SETTINGS = PrewarmSettings(tick_seconds=5, batch=4, max_in_flight=8, max_warm_age=3600)
VMS = [VmView(name="ubuntu", hostname="ubuntu", ip="10.0.0.1", phase="Running", ready=True)]


class Clock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Queue:
    """The prewarmer's ``enqueue(name, payload)``; every payload must be its task's."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, str]]] = []
        self._lock = threading.Lock()

    def __call__(self, name: str, payload: Mapping[str, str]) -> None:
        checked = check_payload(name, payload)  # raises on a payload the task would refuse
        with self._lock:
            self.sent.append((name, checked))

    def take(self, name: str) -> list[dict[str, str]]:
        with self._lock:
            taken = [payload for n, payload in self.sent if n == name]
            self.sent = [(n, p) for n, p in self.sent if n != name]
        return taken


@pytest.fixture(params=["redis", "memory"])
def store(request: pytest.FixtureRequest, redis_url: str) -> Iterator[PoolStore]:
    if request.param == "memory":
        yield MemoryPoolStore()
        return
    client = redis.Redis.from_url(redis_url)
    prefix = f"test-prewarm-{uuid.uuid4().hex[:8]}"
    try:
        yield RedisPoolStore(client, prefix=prefix)
    finally:
        keys = list(client.scan_iter(f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def prewarmer(
    store: PoolStore,
    clock: Clock,
    queue: Queue,
    *,
    claim_is_live: Callable[[WarmEnvironment], bool] | None = None,
    settings: PrewarmSettings = SETTINGS,
) -> Prewarmer:
    return Prewarmer(
        store=store,
        templates=TEMPLATES,
        regions=["local"],
        settings=settings,
        enqueue=queue,
        clock=clock,
        claim_is_live=claim_is_live,
    )


def boot_all(store: PoolStore, queue: Queue, clock: Clock, key: PoolKey = UBUNTU) -> None:
    """What the prewarm workers would do: every enqueued boot becomes ready now."""
    for payload in queue.take(PREWARM_ENVIRONMENT):
        env_id = payload["environment_id"]
        env = store.environment(env_id)
        assert env is not None
        store.mark_ready(PoolKey(env.region, env.template), env_id, vms=VMS, at=clock.now)


def test_a_static_pool_fills_a_batch_per_tick_and_stops_at_its_size(store: PoolStore) -> None:
    clock, queue = Clock(), Queue()
    store.set_config(UBUNTU, PoolConfig(size=10))
    warmer = prewarmer(store, clock, queue)
    [ubuntu] = [o for o in warmer.tick() if o.key == UBUNTU]
    assert (ubuntu.target, ubuntu.created) == (10, 4)
    assert len(queue.take(PREWARM_ENVIRONMENT)) == 4
    clock.now += 5
    warmer.tick()
    assert len(queue.take(PREWARM_ENVIRONMENT)) == 4  # 8 booting: the in-flight bound
    clock.now += 5
    warmer.tick()
    assert queue.take(PREWARM_ENVIRONMENT) == []
    # Boots finish; nothing is booting any more, so the last two are made.
    for env in store.snapshot(UBUNTU).booting:
        store.mark_ready(UBUNTU, env.env_id, vms=VMS, at=clock.now)
    clock.now += 5
    warmer.tick()
    boot_all(store, queue, clock)
    clock.now += 5
    warmer.tick()
    assert queue.sent == []
    assert len(store.snapshot(UBUNTU).ready) == 10
    assert store.snapshot(UBUNTU).target == 10


def test_pools_without_configuration_hold_nothing(store: PoolStore) -> None:
    clock, queue = Clock(), Queue()
    outcomes = prewarmer(store, clock, queue).tick()
    assert {o.key for o in outcomes} == {UBUNTU, KUBERNETES}
    assert all(o.target == 0 and o.created == 0 for o in outcomes)
    assert queue.sent == []


def test_a_smaller_size_retires_the_surplus(store: PoolStore) -> None:
    clock, queue = Clock(), Queue()
    warmer = prewarmer(store, clock, queue)
    store.set_config(UBUNTU, PoolConfig(size=4))
    warmer.tick()
    boot_all(store, queue, clock)
    store.set_config(UBUNTU, PoolConfig(size=1))
    clock.now += 5
    warmer.tick()
    retired = queue.take(RETIRE_ENVIRONMENT)
    assert len(retired) == 3
    assert all(payload["region"] == "local" for payload in retired)
    assert {payload["environment_id"] for payload in retired}.isdisjoint(
        env.env_id for env in store.snapshot(UBUNTU).ready
    )
    assert len(store.snapshot(UBUNTU).ready) == 1


def test_pauses_stop_creation(store: PoolStore) -> None:
    clock, queue = Clock(), Queue()
    warmer = prewarmer(store, clock, queue)
    store.set_config(UBUNTU, PoolConfig(size=3, paused=True))
    [ubuntu] = [o for o in warmer.tick() if o.key == UBUNTU]
    assert (ubuntu.created, ubuntu.blocked) == (0, "paused")
    store.set_config(UBUNTU, PoolConfig(size=3))
    store.set_globally_paused(True)
    warmer.tick()
    assert queue.sent == []
    store.set_globally_paused(False)
    warmer.tick()
    assert len(queue.take(PREWARM_ENVIRONMENT)) == 3


def test_a_drained_region_creates_nothing_and_keeps_what_it_holds(store: PoolStore) -> None:
    clock, queue = Clock(), Queue()
    drained: set[str] = set()
    eu = PoolKey("eu", "ubuntu")
    warmer = Prewarmer(
        store=store,
        templates=TEMPLATES,
        regions=["local", "eu"],
        settings=SETTINGS,
        enqueue=queue,
        clock=clock,
        drained_regions=lambda: drained,
    )
    store.set_config(UBUNTU, PoolConfig(size=2))
    store.set_config(eu, PoolConfig(size=2))
    warmer.tick()
    boot_all(store, queue, clock)
    store.set_config(UBUNTU, PoolConfig(size=3))
    store.set_config(eu, PoolConfig(size=3))
    drained.add("eu")
    clock.now += 5

    ticks = {o.key: o for o in warmer.tick()}

    assert (ticks[eu].created, ticks[eu].blocked) == (0, "paused")
    assert ticks[UBUNTU].created == 1  # the other region goes on
    created = [store.environment(p["environment_id"]) for p in queue.take(PREWARM_ENVIRONMENT)]
    assert [env.region for env in created if env is not None] == ["local"]
    assert len(store.snapshot(eu).ready) == 2  # live ones stay until they finish
    assert queue.take(RETIRE_ENVIRONMENT) == []
    drained.clear()
    clock.now += 5
    assert {o.key: o for o in warmer.tick()}[eu].created == 1


def test_vmis_waiting_for_capacity_stop_every_pool_of_the_region(store: PoolStore) -> None:
    clock, queue = Clock(), Queue()
    warmer = prewarmer(store, clock, queue)
    store.set_config(UBUNTU, PoolConfig(size=2))
    warmer.tick()
    [first, _] = queue.take(PREWARM_ENVIRONMENT)
    store.mark_unschedulable(first["environment_id"], unschedulable=True)
    store.set_config(KUBERNETES, PoolConfig(size=2))
    clock.now += 5
    outcomes = {o.key: o for o in warmer.tick()}
    assert outcomes[KUBERNETES].created == 0
    assert outcomes[KUBERNETES].blocked == "capacity"
    store.mark_unschedulable(first["environment_id"], unschedulable=False)
    clock.now += 5
    warmer.tick()
    assert len(queue.take(PREWARM_ENVIRONMENT)) == 2


def test_failing_creations_back_off_then_probe_one_at_a_time(store: PoolStore) -> None:
    clock, queue = Clock(), Queue()
    warmer = prewarmer(store, clock, queue)
    store.set_config(UBUNTU, PoolConfig(size=4))
    store.record_failure(UBUNTU, at=clock.now)
    assert [o.blocked for o in warmer.tick() if o.key == UBUNTU] == ["backoff"]
    clock.now += 60
    warmer.tick()
    assert len(queue.take(PREWARM_ENVIRONMENT)) == 1
    store.record_success(UBUNTU, refill_seconds=20)
    clock.now += 5
    warmer.tick()
    assert len(queue.take(PREWARM_ENVIRONMENT)) == 3


def test_prewarmers_racing_on_one_pool_stay_within_target_plus_a_batch(
    store: PoolStore,
) -> None:
    """Eight prewarmers per round, all at once; the lock is bypassed on purpose so that only
    the reservation's own check stands between them and an overfull pool."""
    clock, queue = Clock(), Queue()
    store.set_config(UBUNTU, PoolConfig(size=6))
    settings = PrewarmSettings(tick_seconds=5, batch=4, max_in_flight=50, max_warm_age=3600)
    warmers = [prewarmer(store, clock, queue, settings=settings) for _ in range(8)]
    for _ in range(5):
        barrier = threading.Barrier(len(warmers))

        def race(warmer: Prewarmer, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            warmer._reconcile(  # no lock: the worst case
                UBUNTU, TEMPLATES["ubuntu"], now=clock.now, paused=False, capacity_blocked=False
            )

        with ThreadPoolExecutor(max_workers=len(warmers)) as executor:
            list(executor.map(race, warmers))
        snapshot = store.snapshot(UBUNTU)
        assert len(snapshot.ready) + len(snapshot.booting) <= 6 + settings.batch
        clock.now += 5
    assert len(queue.take(PREWARM_ENVIRONMENT)) <= 6 + settings.batch


def test_the_lock_lets_one_prewarmer_act_per_pool(store: PoolStore) -> None:
    clock, queue = Clock(), Queue()
    store.set_config(UBUNTU, PoolConfig(size=2))
    warmer = prewarmer(store, clock, queue)
    with store.lock(UBUNTU, seconds=10):
        [ubuntu] = [o for o in warmer.tick() if o.key == UBUNTU]
    assert ubuntu.skipped
    assert queue.sent == []


def test_claims_whose_bind_never_came_are_bound_again_or_removed(store: PoolStore) -> None:
    clock, queue = Clock(), Queue()
    live: set[str] = {"s-live"}
    warmer = prewarmer(store, clock, queue, claim_is_live=lambda env: env.session_id in live)
    store.set_config(UBUNTU, PoolConfig(size=2))
    warmer.tick()
    boot_all(store, queue, clock)
    store.set_config(UBUNTU, PoolConfig(size=0))
    for session_id in ("s-live", "s-gone"):
        assert store.claim(UBUNTU, session_id=session_id, at=clock.now) is not None
    clock.now += UNBOUND_CLAIM_GRACE_SECONDS / 2
    warmer.tick()
    assert queue.sent == []
    clock.now += UNBOUND_CLAIM_GRACE_SECONDS
    warmer.tick()
    assert queue.take(BIND_ENVIRONMENT) == [{"session_id": "s-live"}]
    [retired] = queue.take(RETIRE_ENVIRONMENT)
    orphan = store.environment(retired["environment_id"])
    assert orphan is not None
    assert (orphan.session_id, retired["region"]) == ("s-gone", "local")
    clock.now += 5
    warmer.tick()
    assert queue.sent == []  # dealt with once


# -- adaptive pools on the fake clock --------------------------------------------------------

ADAPTIVE = PoolConfig(mode=PoolMode.ADAPTIVE, min_size=0, max_size=40)
CLASS_SETTINGS = PrewarmSettings(tick_seconds=5, batch=10, max_in_flight=40, max_warm_age=3600)


def run_class(
    store: PoolStore, warmer: Prewarmer, clock: Clock, queue: Queue, *, start: float
) -> tuple[int, int, float | None]:
    """Thirty learners in one minute (one every two seconds), boots taking 30 s; ticks every
    5 s. Returns warm hits, misses and when the prewarmer first reserved a batch of 10+."""
    arrivals = [start + 2 * i for i in range(30)]
    booting: dict[str, float] = {}
    hits = misses = 0
    reacted_at = None
    clock.now = start - 10 * 60
    while clock.now < start + 5 * 60:
        for env_id, done in list(booting.items()):
            if done <= clock.now:
                store.mark_ready(UBUNTU, env_id, vms=VMS, at=done)
                del booting[env_id]
        for at in [a for a in arrivals if clock.now - 1 < a <= clock.now]:
            session_id = f"s-{uuid.uuid4().hex[:6]}"
            env = store.claim(UBUNTU, session_id=session_id, at=at)
            store.record_claim(UBUNTU, session_id=session_id, hit=env is not None, at=at)
            if env is not None:
                store.forget_claim(UBUNTU, env.id)
            hits, misses = hits + (env is not None), misses + (env is None)
        if clock.now % 5 == 0:
            warmer.tick()
            started = queue.take(PREWARM_ENVIRONMENT)
            for payload in started:
                booting[payload["environment_id"]] = clock.now + 30
            if reacted_at is None and len(booting) + len(store.snapshot(UBUNTU).ready) >= 10:
                reacted_at = clock.now
        clock.now += 1
    return hits, misses, reacted_at


def test_an_adaptive_pool_reacts_to_a_class_within_a_minute(store: PoolStore) -> None:
    clock, queue = Clock(), Queue()
    store.set_config(UBUNTU, ADAPTIVE)
    warmer = prewarmer(store, clock, queue, settings=CLASS_SETTINGS)
    start = START - START % 60
    hits, misses, reacted_at = run_class(store, warmer, clock, queue, start=start)
    assert hits + misses == 30
    assert reacted_at is not None
    assert reacted_at - start <= 60  # ten or more warm or warming within a minute
    assert hits > 0  # the later learners of the first class already find warm ones


def test_an_adaptive_pool_learns_a_weekly_class_and_is_ready_for_it(store: PoolStore) -> None:
    clock, queue = Clock(), Queue()
    store.set_config(UBUNTU, ADAPTIVE)
    warmer = prewarmer(store, clock, queue, settings=CLASS_SETTINGS)
    lesson = START - START % SLOT_SECONDS + 8 * SLOT_SECONDS
    first_hits, _, _ = run_class(store, warmer, clock, queue, start=lesson)
    # A quiet week: the prewarmer ticks now and then and folds the finished slots.
    for env in store.snapshot(UBUNTU).ready:
        store.retire(UBUNTU, env.env_id)
    next_week = lesson + WEEK_SECONDS
    clock.now = lesson + 30 * 60
    while clock.now < next_week - LEAD_SECONDS - 30 * 60:
        warmer.tick()
        clock.now += SLOT_SECONDS
    queue.sent.clear()
    hits, _, reacted_at = run_class(store, warmer, clock, queue, start=next_week)
    assert reacted_at is not None
    assert reacted_at < next_week  # warm before the first learner arrives
    assert hits >= 28
    assert hits > first_hits
