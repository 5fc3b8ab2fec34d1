"""Per-region caps: live sessions and environments booting at once.

The rules (``shared.domain.regions``) on their own, then through the HTTP API: two regions,
"eu" at Frankfurt (the default) and "us" at Virginia, with no VM capacity limit so that only
the caps refuse. Sessions live in fakeredis; the pools in the real Redis (their steps are Lua
scripts), under a key prefix of each test's own. Last, the prewarmer's share of the booting cap.
"""

from __future__ import annotations

from typing import Any

import fakeredis
import pytest
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
from shared.domain.pools.config import PoolConfig, PoolKey
from shared.domain.pools.environments import new_warm_environment
from shared.domain.regions import (
    BOOTING_RETRY_AFTER_SECONDS,
    FULL_RETRY_AFTER_SECONDS,
    Location,
    NoRegion,
    RegionChoice,
    RegionHint,
    RegionState,
    Unusable,
    choose_region,
)
from shared.domain.sessions import VmView
from shared.runtime import Runtime
from tests.doubles import RecordingCelery

FRONTEND = "f" * 20
ADMIN = "a" * 20
NOW = 1_700_000_000.0
TEMPLATES = load_templates(None)  # ubuntu: one VM; kubernetes: two
FRANKFURT = Location(50.1, 8.7)
VIRGINIA = Location(38.9, -77.0)
PARIS = {"lat": 48.86, "lon": 2.35}
VMS = [VmView(name="ubuntu", hostname="ubuntu", ip="10.244.1.7", phase="Running", ready=True)]


# -- the rules ---------------------------------------------------------------------------------


def region(**kw: Any) -> RegionState:
    return RegionState(name="eu", location=FRANKFURT, **kw)


def test_a_region_at_its_cap_of_live_sessions_is_refused_and_worth_retrying() -> None:
    assert region(live_sessions=9, max_live_sessions=10).unusable_for(1) is None
    at_cap = region(live_sessions=10, max_live_sessions=10)
    assert at_cap.unusable_for(1) is Unusable.SESSION_CAP
    # A warm environment is no way round it: a claimed one is a live session too.
    assert region(live_sessions=10, max_live_sessions=10, warm=3).unusable_for(1) is (
        Unusable.SESSION_CAP
    )
    with pytest.raises(NoRegion) as refused:
        choose_region([at_cap], hint=RegionHint(region="eu"), vms=1, default_region="eu")
    assert refused.value.why is Unusable.SESSION_CAP
    assert refused.value.retry_after == FULL_RETRY_AFTER_SECONDS
    assert "eu is at its cap of live sessions" in refused.value.message


def test_a_region_booting_all_it_may_refuses_cold_starts_but_not_warm_claims() -> None:
    assert region(booting=4, max_booting=5).unusable_for(1) is None
    busy = region(booting=5, max_booting=5)
    assert busy.unusable_for(1) is Unusable.BOOTING_CAP
    assert region(booting=5, max_booting=5, warm=1).unusable_for(1) is None
    with pytest.raises(NoRegion) as refused:
        choose_region([busy], hint=RegionHint(), vms=1, default_region="eu")
    assert refused.value.why is Unusable.BOOTING_CAP
    assert refused.value.retry_after == BOOTING_RETRY_AFTER_SECONDS


def test_without_caps_counts_refuse_nothing() -> None:
    assert region(live_sessions=10_000, booting=10_000).unusable_for(1) is None


def test_down_drained_and_full_come_before_the_caps() -> None:
    capped = {"live_sessions": 1, "max_live_sessions": 1, "booting": 1, "max_booting": 1}
    assert region(down=True, **capped).unusable_for(1) is Unusable.DOWN
    assert region(drained=True, **capped).unusable_for(1) is Unusable.DRAINED
    full = region(capacity_vms=1, vms_in_use=1, **capped)
    assert full.unusable_for(1) is Unusable.FULL
    assert region(**capped).unusable_for(1) is Unusable.SESSION_CAP


@st.composite
def capped_regions(draw: st.DrawFn) -> list[RegionState]:
    names = ["eu", "us", "ap"][: draw(st.integers(min_value=1, max_value=3))]
    return [
        RegionState(
            name=name,
            location=Location(draw(st.floats(-60, 60)), draw(st.floats(-180, 180))),
            live_sessions=draw(st.integers(0, 6)),
            max_live_sessions=draw(st.none() | st.integers(1, 5)),
            booting=draw(st.integers(0, 6)),
            max_booting=draw(st.none() | st.integers(1, 5)),
            warm=draw(st.sampled_from([0, 0, 1])),
        )
        for name in names
    ]


def attempt(regions: list[RegionState], hint: RegionHint) -> RegionChoice | NoRegion:
    try:
        return choose_region(regions, hint=hint, vms=1, default_region="eu")
    except NoRegion as refused:
        return refused


@given(capped_regions(), st.sampled_from(["none", "location"]))
def test_a_choice_never_lands_on_a_capped_region(regions: list[RegionState], kind: str) -> None:
    hint = RegionHint(location=Location(48.86, 2.35)) if kind == "location" else RegionHint()
    by_name = {r.name: r for r in regions}
    choice = attempt(regions, hint)
    if isinstance(choice, NoRegion):
        # Every region it passed is at a cap, and asking again later may work.
        assert all(by_name[name].unusable_for(1) is why for name, why in choice.passed)
        assert {why for _, why in choice.passed} <= {Unusable.SESSION_CAP, Unusable.BOOTING_CAP}
        assert choice.retry_after is not None
        return
    chosen = by_name[choice.region]
    if chosen.max_live_sessions is not None:
        assert chosen.live_sessions < chosen.max_live_sessions
    if chosen.max_booting is not None and not chosen.warm:
        assert chosen.booting < chosen.max_booting


# -- through the API ---------------------------------------------------------------------------


class CappedApi:
    def __init__(
        self, pools: RedisPoolStore | None, *, max_live: int = 100, max_booting: int = 100
    ) -> None:
        self.redis = fakeredis.FakeRedis()
        self.sessions = RedisSessionStore(self.redis)
        self.celery = RecordingCelery()
        self.pools = pools
        self.runtime = Runtime(
            settings=Settings(
                mode=Mode.DEV,
                frontend_tokens=frozenset({FRONTEND}),
                admin_tokens=frozenset({ADMIN}),
                default_region="eu",
                clusters=(
                    Cluster("eu", None, None, "default", location=FRANKFURT),
                    Cluster("us", None, None, "default", location=VIRGINIA),
                ),
                limits=Limits(region_max_live_sessions=max_live, region_max_booting=max_booting),
            ),
            redis=self.redis,
            sessions=self.sessions,
            templates=TEMPLATES,
            celery=self.celery,  # type: ignore[arg-type]
            clock=lambda: NOW,
            pools=pools,
        )
        self.client: FlaskClient = create_app(self.runtime).test_client()

    def call(self, method: str, path: str, *, token: str = FRONTEND, **kw: Any) -> TestResponse:
        response = self.client.open(
            path, method=method, headers={"Authorization": f"Bearer {token}"}, **kw
        )
        assert response.status_code != 500, response.get_data(as_text=True)
        return response

    def create(self, user: str, template: str = "ubuntu", **extra: Any) -> TestResponse:
        return self.call("POST", "/v1/sessions", json={"template": template, "user": user, **extra})

    def opened(self, user: str, template: str = "ubuntu", **extra: Any) -> dict[str, Any]:
        response = self.create(user, template, **extra)
        assert response.status_code == 201, response.get_json()
        body: dict[str, Any] = response.get_json()
        return body

    def warm_up(self, key: PoolKey, count: int = 1) -> None:
        assert self.pools is not None
        envs = [new_warm_environment(key=key, now=NOW - 600) for _ in range(count)]
        for env in self.pools.reserve(key, envs, ceiling=count, max_in_flight=count):
            assert self.pools.mark_ready(key, env.id, vms=VMS, at=NOW - 500)

    def boot_in_pool(self, key: PoolKey, count: int) -> None:
        assert self.pools is not None
        envs = [new_warm_environment(key=key, now=NOW - 5) for _ in range(count)]
        assert len(self.pools.reserve(key, envs, ceiling=count, max_in_flight=count)) == count


def refused(response: TestResponse, code: str) -> dict[str, Any]:
    assert response.status_code == 503, response.get_json()
    assert response.mimetype == "application/problem+json"
    body: dict[str, Any] = response.get_json()
    assert body["code"] == code, body
    return body


def test_an_explicit_region_at_its_session_cap_answers_503_naming_it(
    pool_store: RedisPoolStore,
) -> None:
    api = CappedApi(pool_store, max_live=2)
    api.opened("ann", region="eu")
    api.opened("bob", region="eu")
    body = refused(api.create("cid", region="eu"), "region_session_cap")
    assert api.create("cid", region="eu").headers["Retry-After"] == str(FULL_RETRY_AFTER_SECONDS)
    assert body["region"] == "eu"
    assert body["regions"] == [{"region": "eu", "why": "session_cap"}]
    assert "eu is at its cap of live sessions" in body["detail"]
    # The other region has its own cap.
    assert api.opened("cid", region="us")["region"] == "us"


def test_a_session_that_ends_gives_its_place_back(pool_store: RedisPoolStore) -> None:
    api = CappedApi(pool_store, max_live=1)
    first = api.opened("ann", region="eu")
    refused(api.create("bob", region="eu"), "region_session_cap")
    api.call("DELETE", f"/v1/sessions/{first['id']}")
    # Closing: its VMs still exist, so it still holds its place until it has ended.
    refused(api.create("bob", region="eu"), "region_session_cap")
    assert api.runtime.life.finish(first["id"])
    assert api.opened("bob", region="eu")["region"] == "eu"


def test_a_location_goes_to_the_next_nearest_region_with_room(pool_store: RedisPoolStore) -> None:
    api = CappedApi(pool_store, max_live=1)
    api.opened("ann", location=PARIS)
    body = api.opened("bob", location=PARIS)
    assert body["region"] == "us"
    assert body["region_reason"].startswith("nearest region eu is at its cap of live sessions")
    # No hint: the default region first, then the nearest to it.
    assert refused(api.create("cid"), "no_region_available")["regions"] == [
        {"region": "eu", "why": "session_cap"},
        {"region": "us", "why": "session_cap"},
    ]


def test_cold_boots_stop_at_the_booting_cap_and_resume_when_one_is_up(
    pool_store: RedisPoolStore,
) -> None:
    api = CappedApi(pool_store, max_booting=2)
    first = api.opened("ann", region="eu")
    api.opened("bob", region="eu")
    response = api.create("cid", region="eu")
    body = refused(response, "region_booting_cap")
    assert response.headers["Retry-After"] == str(BOOTING_RETRY_AFTER_SECONDS)
    assert body["regions"] == [{"region": "eu", "why": "booting_cap"}]
    assert api.runtime.life.mark_ready(first["id"], VMS)
    assert api.opened("cid", region="eu")["state"] == "provisioning"


def test_warm_pools_booting_count_against_the_cap(pool_store: RedisPoolStore) -> None:
    api = CappedApi(pool_store, max_booting=3)
    api.boot_in_pool(PoolKey("eu", "kubernetes"), 2)
    api.opened("ann", region="eu")
    refused(api.create("bob", region="eu"), "region_booting_cap")
    assert api.opened("bob", location=PARIS)["region"] == "us"


def test_a_warm_claim_boots_nothing_and_passes_the_booting_cap(
    pool_store: RedisPoolStore,
) -> None:
    api = CappedApi(pool_store, max_booting=1)
    api.opened("ann", region="eu")
    refused(api.create("bob", region="eu"), "region_booting_cap")
    api.warm_up(PoolKey("eu", "ubuntu"))
    body = api.opened("bob", region="eu")
    assert (body["state"], body["warm"]) == ("ready", True)
    # The pool is empty again: the next cold start waits.
    refused(api.create("cid", region="eu"), "region_booting_cap")


def test_a_replace_is_not_refused_for_the_place_its_own_session_holds(
    pool_store: RedisPoolStore,
) -> None:
    api = CappedApi(pool_store, max_live=2, max_booting=2)
    old = api.opened("ann", region="eu")
    api.opened("bob", region="eu")
    refused(api.create("cid", region="eu"), "region_session_cap")
    new = api.opened("ann", "kubernetes", region="eu", replace=True)
    assert new["region"] == "eu"
    assert api.sessions.require(old["id"]).state.value == "terminating"
    # Someone else's replace of nothing frees nothing.
    refused(api.create("cid", region="eu", replace=True), "region_session_cap")


def test_a_reconnect_is_never_refused(pool_store: RedisPoolStore) -> None:
    api = CappedApi(pool_store, max_live=1, max_booting=1)
    first = api.opened("ann", region="eu")
    again = api.create("ann", region="eu")
    assert again.status_code == 200, again.get_json()
    assert (again.get_json()["id"], again.get_json()["reconnected"]) == (first["id"], True)


# -- the prewarmer -----------------------------------------------------------------------------


class Queue:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, str]]] = []

    def __call__(self, name: str, payload: Any) -> None:
        self.sent.append((name, dict(payload)))


def prewarmer(
    store: RedisPoolStore, sessions_booting: dict[str, int], *, max_booting: int | None
) -> tuple[Prewarmer, Queue]:
    queue = Queue()
    warmer = Prewarmer(
        store=store,
        templates=TEMPLATES,
        regions=["eu", "us"],
        settings=PrewarmSettings(
            tick_seconds=5,
            batch=10,
            max_in_flight=20,
            max_warm_age=3600,
            region_max_booting=max_booting,
        ),
        enqueue=queue,
        clock=lambda: NOW,
        sessions_booting=lambda region: sessions_booting.get(region, 0),
    )
    return warmer, queue


def test_the_prewarmer_boots_no_more_than_the_region_may_at_once(
    pool_store: RedisPoolStore,
) -> None:
    for template in ("kubernetes", "ubuntu"):
        pool_store.set_config(PoolKey("eu", template), PoolConfig(size=8))
        pool_store.set_config(PoolKey("us", template), PoolConfig(size=2))
    warmer, _ = prewarmer(pool_store, {"eu": 3}, max_booting=10)
    ticks = {(t.key.region, t.key.template): t for t in warmer.tick()}
    # eu: 3 learners' sessions boot, and 2 of the cap of 10 stay free for learners' cold
    # starts: 5 more may, kubernetes' pool first, by name.
    assert (ticks["eu", "kubernetes"].created, ticks["eu", "ubuntu"].created) == (5, 0)
    assert ticks["eu", "ubuntu"].blocked == "booting_cap"
    assert (ticks["us", "kubernetes"].created, ticks["us", "ubuntu"].created) == (2, 2)
    # Next tick, nothing has finished booting: nothing more starts.
    again = {(t.key.region, t.key.template): t for t in warmer.tick()}
    assert again["eu", "kubernetes"].created + again["eu", "ubuntu"].created == 0


def test_without_a_cap_the_prewarmer_boots_what_its_batches_allow(
    pool_store: RedisPoolStore,
) -> None:
    pool_store.set_config(PoolKey("eu", "ubuntu"), PoolConfig(size=8))
    warmer, queue = prewarmer(pool_store, {"eu": 500}, max_booting=None)
    warmer.tick()
    assert len(queue.sent) == 8
