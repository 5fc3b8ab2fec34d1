"""The pool budget: the VMs one region's warm pools may hold together.

The arithmetic (``shared.domain.pools.budget``), the admin API that refuses a size past it, and
the prewarmer that clips its targets and its creations to it. The shipped templates: ubuntu is
one VM, kubernetes two.
"""

from __future__ import annotations

from typing import Any

import fakeredis
from flask.testing import FlaskClient
from hypothesis import given
from hypothesis import strategies as st
from werkzeug.test import TestResponse

from services.api.app import create_app
from services.prewarmer.prewarmer import Prewarmer, PrewarmSettings
from shared.adapters.pool_store import RedisPoolStore
from shared.adapters.session_store import RedisSessionStore
from shared.adapters.template_files import load_templates
from shared.config import Cluster, Limits, Mode, Settings
from shared.domain.pools.budget import (
    PoolWant,
    claimed_vms,
    exceeds_budget,
    fit_to_budget,
    largest_fitting_size,
)
from shared.domain.pools.config import PoolConfig, PoolKey, PoolMode
from shared.domain.sessions import VmView
from shared.jobs import PREWARM_ENVIRONMENT
from shared.runtime import Runtime
from tests.doubles import RecordingCelery

ADMIN = "a" * 20
NOW = 1_700_000_000.0
TEMPLATES = load_templates(None)
UBUNTU = PoolKey("local", "ubuntu")
KUBERNETES = PoolKey("local", "kubernetes")
VMS = [VmView(name="ubuntu", hostname="ubuntu", ip="10.244.1.7", phase="Running", ready=True)]


# -- the arithmetic ----------------------------------------------------------------------------


def test_a_pool_claims_its_size_or_its_adaptive_max_in_vms() -> None:
    assert claimed_vms(PoolConfig(size=5), vms_per_environment=2) == 10
    adaptive = PoolConfig(mode=PoolMode.ADAPTIVE, min_size=1, max_size=7)
    assert claimed_vms(adaptive, vms_per_environment=1) == 7
    assert claimed_vms(PoolConfig(size=5, paused=True), vms_per_environment=1) == 5


def test_only_a_change_that_claims_more_than_before_can_exceed() -> None:
    check = {"vms_per_environment": 2, "others_vms": 30, "budget_vms": 40}
    assert not exceeds_budget(current=PoolConfig(), updated=PoolConfig(size=5), **check)
    assert exceeds_budget(current=PoolConfig(), updated=PoolConfig(size=6), **check)
    # Over a budget lowered since: shrinking or pausing is allowed, growing is not.
    over = PoolConfig(size=20)
    assert not exceeds_budget(current=over, updated=PoolConfig(size=19), **check)
    assert not exceeds_budget(current=over, updated=over.changed(paused=True), **check)
    assert exceeds_budget(current=over, updated=PoolConfig(size=21), **check)


@given(
    budget=st.integers(0, 200),
    others=st.integers(0, 250),
    vms=st.integers(1, 3),
)
def test_the_largest_fitting_size_fits_and_one_more_does_not(
    budget: int, others: int, vms: int
) -> None:
    largest = largest_fitting_size(budget_vms=budget, others_vms=others, vms_per_environment=vms)
    assert largest >= 0
    if largest > 0:
        assert others + largest * vms <= budget
    assert others + (largest + 1) * vms > budget


wants = st.lists(
    st.builds(
        PoolWant,
        template=st.sampled_from(["a", "b", "c", "d", "e"]),
        target=st.integers(0, 60),
        vms_per_environment=st.integers(1, 3),
        elastic=st.booleans(),
    ),
    max_size=5,
    unique_by=lambda w: w.template,
)


@given(wants, st.integers(0, 150))
def test_fitted_targets_stay_within_the_budget_and_use_what_they_can(
    pools: list[PoolWant], budget: int
) -> None:
    fitted = fit_to_budget(pools, budget)
    used = sum(fitted[w.template] * w.vms_per_environment for w in pools)
    wanted = sum(w.target * w.vms_per_environment for w in pools)
    assert set(fitted) == {w.template for w in pools}
    assert all(0 <= fitted[w.template] <= w.target for w in pools)
    if wanted <= budget:
        assert all(fitted[w.template] == w.target for w in pools)
        return
    assert used <= budget
    # Nothing is left that a pool short of its target could still use.
    for want in pools:
        if fitted[want.template] < want.target:
            assert used + want.vms_per_environment > budget
    # Static pools are served before adaptive ones.
    static = [w for w in pools if not w.elastic]
    if sum(w.target * w.vms_per_environment for w in static) <= budget:
        assert all(fitted[w.template] == w.target for w in static)


@given(st.lists(st.integers(1, 60), min_size=2, max_size=4), st.integers(0, 100))
def test_pools_alike_share_the_budget_evenly(targets: list[int], budget: int) -> None:
    pools = [PoolWant(f"t{i}", t, 1, elastic=True) for i, t in enumerate(targets)]
    fitted = fit_to_budget(pools, budget)
    # Round robin: a pool cut short holds at least as many as any other, less one.
    for want in pools:
        if fitted[want.template] < want.target:
            assert fitted[want.template] >= max(fitted.values()) - 1


# -- the admin API -----------------------------------------------------------------------------


class BudgetApi:
    def __init__(self, pools: RedisPoolStore, *, budget: int) -> None:
        self.pools = pools
        runtime = Runtime(
            settings=Settings(
                mode=Mode.DEV,
                admin_tokens=frozenset({ADMIN}),
                clusters=(
                    Cluster("local", None, None, "default"),
                    Cluster("eu", None, None, "default"),
                ),
                limits=Limits(region_pool_budget_vms=budget),
            ),
            redis=fakeredis.FakeRedis(),
            sessions=RedisSessionStore(fakeredis.FakeRedis()),
            templates=TEMPLATES,
            celery=RecordingCelery(),  # type: ignore[arg-type]
            clock=lambda: NOW,
            pools=pools,
        )
        self.client: FlaskClient = create_app(runtime).test_client()

    def put(self, path: str, body: Any) -> TestResponse:
        response = self.client.put(path, json=body, headers={"Authorization": f"Bearer {ADMIN}"})
        assert response.status_code != 500, response.get_data(as_text=True)
        return response

    def config(self, key: PoolKey) -> PoolConfig:
        return self.pools.config(key, default=PoolConfig())


def over_budget(response: TestResponse) -> dict[str, Any]:
    assert response.status_code == 422, response.get_json()
    assert response.mimetype == "application/problem+json"
    body: dict[str, Any] = response.get_json()
    assert body["code"] == "pool_budget_exceeded", body
    return body


def test_a_size_past_the_budget_is_refused_with_what_would_fit(pool_store: RedisPoolStore) -> None:
    api = BudgetApi(pool_store, budget=20)
    assert api.put("/v1/admin/pools/kubernetes", {"size": 6}).status_code == 200  # 12 VMs
    body = over_budget(api.put("/v1/admin/pools/ubuntu", {"size": 9}))
    assert body["budget_vms"] == 20
    assert body["other_pools_vms"] == 12
    assert body["other_pools"] == [{"template": "kubernetes", "vms": 12}]
    assert (body["field"], body["largest_size"], body["region"]) == ("size", 8, "local")
    assert body["errors"] == [{"pointer": "/size", "detail": "at most 8 fits the pool budget"}]
    assert "the largest size that fits is 8" in body["detail"]
    assert api.config(UBUNTU) == PoolConfig()  # nothing stored
    assert api.put("/v1/admin/pools/ubuntu", {"size": 8}).status_code == 200


def test_an_environment_of_two_vms_counts_twice(pool_store: RedisPoolStore) -> None:
    api = BudgetApi(pool_store, budget=10)
    body = over_budget(api.put("/v1/admin/pools/kubernetes", {"size": 6}))
    assert (body["vms_per_environment"], body["largest_size"]) == (2, 5)
    assert api.put("/v1/admin/pools/kubernetes", {"size": 5}).status_code == 200


def test_the_new_size_replaces_the_old_one(pool_store: RedisPoolStore) -> None:
    api = BudgetApi(pool_store, budget=10)
    assert api.put("/v1/admin/pools/ubuntu", {"size": 10}).status_code == 200
    assert api.put("/v1/admin/pools/ubuntu", {"size": 4}).status_code == 200
    assert api.put("/v1/admin/pools/ubuntu", {"size": 10}).status_code == 200


def test_an_adaptive_pool_claims_its_max(pool_store: RedisPoolStore) -> None:
    api = BudgetApi(pool_store, budget=30)
    assert api.put("/v1/admin/pools/ubuntu", {"size": 10}).status_code == 200
    body = over_budget(
        api.put("/v1/admin/pools/kubernetes", {"mode": "adaptive", "min": 1, "max": 11})
    )
    assert (body["field"], body["largest_size"]) == ("max", 10)
    assert body["errors"][0]["pointer"] == "/max"
    ok = api.put("/v1/admin/pools/kubernetes", {"mode": "adaptive", "min": 1, "max": 10})
    assert ok.status_code == 200, ok.get_json()
    # An adaptive pool's max counts for the others too.
    assert over_budget(api.put("/v1/admin/pools/ubuntu", {"size": 11}))["other_pools_vms"] == 20


def test_each_region_has_its_own_budget(pool_store: RedisPoolStore) -> None:
    api = BudgetApi(pool_store, budget=10)
    assert api.put("/v1/admin/pools/ubuntu", {"size": 10}).status_code == 200
    assert api.put("/v1/admin/pools/ubuntu?region=eu", {"size": 10}).status_code == 200
    over_budget(api.put("/v1/admin/pools/kubernetes?region=eu", {"size": 1}))


def test_over_a_lowered_budget_a_pool_may_still_shrink_or_pause(
    pool_store: RedisPoolStore,
) -> None:
    pool_store.set_config(UBUNTU, PoolConfig(size=30))  # stored under a larger budget
    api = BudgetApi(pool_store, budget=10)
    assert api.put("/v1/admin/pools/ubuntu", {"paused": True}).status_code == 200
    assert api.put("/v1/admin/pools/ubuntu", {"size": 20}).status_code == 200
    over_budget(api.put("/v1/admin/pools/ubuntu", {"size": 21}))
    over_budget(api.put("/v1/admin/pools/kubernetes", {"size": 1}))


# -- the prewarmer -----------------------------------------------------------------------------


class Queue:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, str]]] = []

    def __call__(self, name: str, payload: Any) -> None:
        self.sent.append((name, dict(payload)))

    def take(self, name: str) -> list[dict[str, str]]:
        taken = [p for n, p in self.sent if n == name]
        self.sent = [(n, p) for n, p in self.sent if n != name]
        return taken


def prewarmer(store: RedisPoolStore, queue: Queue, *, budget: int | None) -> Prewarmer:
    return Prewarmer(
        store=store,
        templates=TEMPLATES,
        regions=["local"],
        settings=PrewarmSettings(
            tick_seconds=5,
            batch=50,
            max_in_flight=50,
            max_warm_age=3600,
            region_pool_budget_vms=budget,
        ),
        enqueue=queue,
        clock=lambda: NOW,
    )


def boot_all(store: RedisPoolStore, queue: Queue) -> None:
    for payload in queue.take(PREWARM_ENVIRONMENT):
        env = store.environment(payload["environment_id"])
        assert env is not None
        store.mark_ready(PoolKey(env.region, env.template), env.id, vms=VMS, at=NOW)


def held_vms(store: RedisPoolStore) -> int:
    return sum(
        (len(s.ready) + len(s.booting)) * len(TEMPLATES[key.template].vms)
        for key in (UBUNTU, KUBERNETES)
        for s in [store.snapshot(key)]
    )


def test_a_budget_lowered_by_configuration_clips_adaptive_targets_first(
    pool_store: RedisPoolStore,
) -> None:
    pool_store.set_config(UBUNTU, PoolConfig(size=10))
    pool_store.set_config(KUBERNETES, PoolConfig(mode=PoolMode.ADAPTIVE, min_size=8, max_size=8))
    queue = Queue()
    prewarmer(pool_store, queue, budget=40).tick()
    boot_all(pool_store, queue)
    assert held_vms(pool_store) == 26
    # The operator lowers the budget and restarts: static first, the adaptive pool gets the rest.
    ticks = {t.key: t for t in prewarmer(pool_store, queue, budget=16).tick()}
    assert (ticks[UBUNTU].target, ticks[KUBERNETES].target) == (10, 3)
    # It retires what is over its target (an adaptive pool keeps one spare for the next claim).
    assert ticks[KUBERNETES].retired == 4
    assert len(pool_store.snapshot(KUBERNETES).ready) == 4


def test_when_even_static_sizes_do_not_fit_every_pool_gives_way(
    pool_store: RedisPoolStore,
) -> None:
    pool_store.set_config(UBUNTU, PoolConfig(size=20))
    pool_store.set_config(KUBERNETES, PoolConfig(size=20))
    queue = Queue()
    ticks = {t.key: t for t in prewarmer(pool_store, queue, budget=30).tick()}
    assert (ticks[KUBERNETES].target, ticks[UBUNTU].target) == (10, 10)
    assert held_vms(pool_store) == 30


def test_creations_stop_at_the_budget_whatever_the_targets(pool_store: RedisPoolStore) -> None:
    # Ready environments left from before, over any target: nothing new is added beside them.
    queue = Queue()
    pool_store.set_config(UBUNTU, PoolConfig(size=12))
    prewarmer(pool_store, queue, budget=None).tick()
    boot_all(pool_store, queue)
    pool_store.set_config(UBUNTU, PoolConfig(size=4))
    pool_store.set_config(KUBERNETES, PoolConfig(size=3))
    ticks = {t.key: t for t in prewarmer(pool_store, queue, budget=12).tick()}
    # Kubernetes is reconciled first (by name) while ubuntu still holds 12 VMs: no room yet.
    assert (ticks[KUBERNETES].created, ticks[KUBERNETES].blocked) == (0, "budget")
    assert ticks[UBUNTU].retired == 8
    ticks = {t.key: t for t in prewarmer(pool_store, queue, budget=12).tick()}
    assert ticks[KUBERNETES].created == 3
    assert held_vms(pool_store) == 10
