"""What counts as demand on a warm pool: new arrivals only.

A reconnect (the same user's live session handed back) and a create that replaces the user's
live session are one learner asking again: they claim a warm environment like any create (a
replace needs one) but record no arrival, hit or miss, so adaptive sizing and the hit rate see
learners, not clicks. Sessions live in fakeredis; the pools in the real Redis, under a key
prefix of each test's own; the prewarmer sizes the adaptive pools on the same fake clock.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import fakeredis
import pytest
import redis

from services.prewarmer.prewarmer import Prewarmer, PrewarmSettings
from shared.adapters.pool_store import RedisPoolStore
from shared.adapters.session_events import SessionEvents
from shared.adapters.session_store import RedisSessionStore
from shared.adapters.template_files import load_templates
from shared.domain.lifecycle import clocks_for
from shared.domain.pools.config import PoolConfig, PoolKey, PoolMode
from shared.domain.pools.environments import new_warm_environment
from shared.domain.sessions import VmView
from shared.jobs import TaskQueue
from shared.session_life import SessionLife
from tests.doubles import RecordingCelery

NOW = 1_700_000_000.0
TEMPLATES = load_templates(None)
CLOCKS = clocks_for(TEMPLATES["ubuntu"])
ADAPTIVE = PoolConfig(mode=PoolMode.ADAPTIVE, min_size=0, max_size=40)
REGIONS = ("local", "eu", "us")
VMS = [VmView(name="ubuntu", hostname="ubuntu", ip="10.244.1.7", phase="Running", ready=True)]


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


class World:
    def __init__(self, pools: RedisPoolStore) -> None:
        client = fakeredis.FakeRedis()
        self.pools = pools
        self.clock = Clock()
        self.life = SessionLife(
            store=RedisSessionStore(client),
            events=SessionEvents(client),
            queue=TaskQueue(RecordingCelery()),  # type: ignore[arg-type]
            clock=self.clock,
            pools=pools,
        )
        for region in REGIONS:
            pools.set_config(PoolKey(region, "ubuntu"), ADAPTIVE)

    def create(self, user: str, region: str, *, template: str = "ubuntu", replace: bool) -> None:
        self.life.open(user=user, template=template, clocks=CLOCKS, replace=replace, region=region)
        self.clock.now += 1

    def claims(self, region: str) -> tuple[int, int]:
        """Claims and misses recorded in the last hour."""
        return self.pools.counters.last_hour(PoolKey(region, "ubuntu"), now=self.clock.now)

    def targets(self) -> dict[str, int]:
        warmer = Prewarmer(
            store=self.pools,
            templates=TEMPLATES,
            regions=REGIONS,
            settings=PrewarmSettings(tick_seconds=5, batch=10, max_in_flight=40, max_warm_age=3600),
            enqueue=lambda _name, _payload: None,
            clock=self.clock,
        )
        return {t.key.region: t.target for t in warmer.tick() if t.key.template == "ubuntu"}


@pytest.fixture
def world(redis_url: str) -> Iterator[World]:
    client = redis.Redis.from_url(redis_url)
    prefix = f"test-demand-{uuid.uuid4().hex[:8]}"
    try:
        yield World(RedisPoolStore(client, prefix=prefix))
    finally:
        keys = list(client.scan_iter(f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def test_fifty_replaces_by_one_user_are_one_arrival_and_do_not_grow_the_pool(
    world: World,
) -> None:
    world.create("alice", "local", replace=True)  # nothing to replace yet: a new arrival
    for _ in range(50):
        world.create("alice", "local", replace=True)
    world.create("bob", "eu", replace=False)  # the same single arrival, for comparison
    for i in range(51):
        world.create(f"learner{i}", "us", replace=False)  # fifty-one learners
    assert world.claims("local") == world.claims("eu") == (1, 1)
    assert world.claims("us") == (51, 51)
    demand = world.pools.demand(PoolKey("local", "ubuntu"), now=world.clock.now)
    assert len(demand.arrivals) == 1
    targets = world.targets()
    assert targets["local"] == targets["eu"] <= 1
    assert targets["us"] >= 10  # the same number of creates from learners does grow it


def test_replacing_with_another_template_is_not_an_arrival_either(world: World) -> None:
    world.create("alice", "local", replace=False)
    for i in range(10):
        template = "kubernetes" if i % 2 == 0 else "ubuntu"
        world.create("alice", "local", template=template, replace=True)
    assert world.claims("local") == (1, 1)
    kubernetes = PoolKey("local", "kubernetes")
    assert world.pools.counters.last_hour(kubernetes, now=world.clock.now) == (0, 0)


def test_reconnects_are_not_arrivals(world: World) -> None:
    for _ in range(50):
        world.create("alice", "local", replace=False)
    assert world.claims("local") == (1, 1)
    assert world.pools.counters.totals(PoolKey("local", "ubuntu")) == {"hits": 0, "misses": 1}


def test_a_replace_still_takes_a_warm_environment_without_counting_a_hit(world: World) -> None:
    key = PoolKey("local", "ubuntu")
    world.create("alice", "local", replace=False)
    envs = [new_warm_environment(key=key, now=NOW - 600)]
    [env] = world.pools.reserve(key, envs, ceiling=1, max_in_flight=1)
    assert world.pools.mark_ready(key, env.id, vms=VMS, at=NOW - 500)
    opened = world.life.open(
        user="alice", template="ubuntu", clocks=CLOCKS, replace=True, region="local"
    )
    assert (opened.session.warm, opened.session.environment_id) == (True, env.id)
    assert world.pools.counters.totals(key) == {"hits": 0, "misses": 1}
