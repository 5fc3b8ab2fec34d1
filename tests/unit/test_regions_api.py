"""Regions through the HTTP API: create with a hint (region, location, country), the answer's
region and reason, full/down/drained regions, the load counted from Redis, the admin routes,
and the workers' heartbeat that says which regions are alive.

Two regions: "eu" at Frankfurt (room for 3 VMs) and "us" at Virginia (room for 10), "eu" the
default. Sessions and region flags live in fakeredis; the pools in the real Redis (their steps
are Lua scripts), under a key prefix of each test's own.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import fakeredis
import pytest
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from services.api.app import create_app
from shared.adapters.hash_tags import session_tag
from shared.adapters.pool_store import RedisPoolStore
from shared.adapters.region_state import RedisRegionState, RegionFlags, RegionHeartbeat
from shared.adapters.session_indexes import region_template_key
from shared.adapters.session_store import RedisSessionStore
from shared.adapters.template_files import load_templates
from shared.config import Cluster, Mode, Settings
from shared.domain.pools.config import PoolKey
from shared.domain.pools.environments import new_warm_environment
from shared.domain.reasons import CloseReason
from shared.domain.regions import FULL_RETRY_AFTER_SECONDS, Location, distance_km
from shared.domain.sessions import VmView
from shared.jobs import BIND_ENVIRONMENT, PROVISION
from shared.runtime import Runtime
from tests.doubles import RecordingCelery
from tests.unit.test_api import context_of, error_of, pointers_of

FRONTEND = "frontend-3f786850e387550fdab836ed7e6dc881"  # strong, as the start-up check wants
ADMIN = "admin-e9d71f5ee7c92d6dc9e92ffdad17b8bd"
NOW = 1_700_000_000.0
TEMPLATES = load_templates(None)  # ubuntu: one VM; kubernetes: two
FRANKFURT = Location(50.1, 8.7)
VIRGINIA = Location(38.9, -77.0)
PARIS = {"lat": 48.86, "lon": 2.35}
NEW_YORK = {"lat": 40.71, "lon": -74.0}
VMS = [VmView(name="ubuntu", hostname="ubuntu", ip="10.244.1.7", phase="Running", ready=True)]


class RegionsApi:
    def __init__(self, pools: RedisPoolStore | None) -> None:
        self.redis = fakeredis.FakeRedis()
        self.sessions = RedisSessionStore(self.redis)
        self.state = RedisRegionState(self.redis)
        self.celery = RecordingCelery()
        self.pools = pools
        self.runtime = Runtime(
            settings=Settings(
                mode=Mode.DEV,
                frontend_tokens=frozenset({FRONTEND}),
                admin_tokens=frozenset({ADMIN}),
                default_region="eu",
                clusters=(
                    Cluster("eu", None, None, "default", location=FRANKFURT, capacity_vms=3),
                    Cluster("us", None, None, "default", location=VIRGINIA, capacity_vms=10),
                ),
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
        assert response.is_json, response.get_data(as_text=True)
        return response

    def create(self, user: str, template: str = "ubuntu", **where: Any) -> TestResponse:
        return self.call("POST", "/v1/sessions", json={"template": template, "user": user, **where})

    def region_of(self, user: str, template: str = "ubuntu", **where: Any) -> str:
        response = self.create(user, template, **where)
        assert response.status_code == 201, response.json
        region: str = response.json["region"]
        return region

    def regions(self) -> dict[str, dict[str, Any]]:
        response = self.call("GET", "/v1/admin/regions", token=ADMIN)
        assert response.status_code == 200, response.json
        return {r["region"]: r for r in response.json["regions"]}

    def drain(self, region: str, drained: bool = True) -> TestResponse:
        return self.call(
            "PUT", f"/v1/admin/regions/{region}", token=ADMIN, json={"drained": drained}
        )

    def went_silent(self, region: str) -> None:
        """Workers reported the region once; its heartbeat has since expired."""
        self.state.heartbeat(["eu", "us"], ttl_seconds=60)
        self.redis.delete(f"labvirt:region:{region}:alive")


@pytest.fixture
def api() -> RegionsApi:
    return RegionsApi(None)


# -- hints -------------------------------------------------------------------------------------


def test_a_location_lands_in_the_nearest_region_and_says_why(api: RegionsApi) -> None:
    paris = api.create("paris", location=PARIS)
    new_york = api.create("newyork", location=NEW_YORK)

    assert paris.status_code == new_york.status_code == 201
    assert (paris.json["region"], new_york.json["region"]) == ("eu", "us")
    km = distance_km(Location(**PARIS), FRANKFURT)
    assert paris.json["region_reason"] == f"nearest with capacity ({km:,.0f} km)"
    assert api.sessions.require(new_york.json["id"]).region == "us"
    assert [t.name for t in api.celery.sent] == [PROVISION, PROVISION]


def test_a_country_is_placed_at_its_centre(api: RegionsApi) -> None:
    brazil = api.create("ana", country="BR")
    germany = api.create("max", country="de")

    assert (brazil.json["region"], germany.json["region"]) == ("us", "eu")
    assert brazil.json["region_reason"].startswith("nearest to BR with capacity (")


def test_no_hint_is_the_default_region(api: RegionsApi) -> None:
    response = api.create("alice")

    assert (response.json["region"], response.json["region_reason"]) == ("eu", "default region")


def test_an_explicit_region_is_kept_however_far(api: RegionsApi) -> None:
    response = api.create("alice", region="us")

    assert (response.json["region"], response.json["region_reason"]) == ("us", "requested")


def test_an_unknown_country_is_422_naming_it(api: RegionsApi) -> None:
    response = api.create("alice", country="XX")

    assert response.status_code == 422
    assert error_of(response)["code"] == "unknown_country"
    assert "'XX'" in error_of(response)["detail"]
    assert context_of(error_of(response)) == {"country": "XX"}
    assert api.celery.sent == []


@pytest.mark.parametrize(
    "where",
    [
        {"region": "eu", "location": PARIS},
        {"location": PARIS, "country": "FR"},
        {"region": "eu", "country": "FR"},
    ],
)
def test_more_than_one_hint_is_422(api: RegionsApi, where: dict[str, Any]) -> None:
    response = api.create("alice", **where)

    assert response.status_code == 422
    assert error_of(response)["code"] == "conflicting_region_hints"
    assert context_of(error_of(response)) == {"given": list(where)}


@pytest.mark.parametrize(
    ("where", "field"),
    [
        ({"location": {"lat": 91, "lon": 0}}, "location"),
        ({"location": {"lat": 0, "lon": -180.5}}, "location"),
        ({"location": {"lat": 10}}, "location"),
        ({"location": {"lat": 10, "lon": 2, "alt": 3}}, "location"),
        ({"location": "Paris"}, "location"),
        ({"country": "FRA"}, "country"),
        ({"country": "F1"}, "country"),
        ({"country": 33}, "country"),
    ],
)
def test_a_malformed_hint_is_400_naming_the_field(
    api: RegionsApi, where: dict[str, Any], field: str
) -> None:
    response = api.create("alice", **where)

    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid_request"
    pointers = pointers_of(error_of(response))
    assert any(p == f"/{field}" or p.startswith(f"/{field}/") for p in pointers), pointers


def test_an_unknown_explicit_region_is_still_422(api: RegionsApi) -> None:
    response = api.create("alice", region="mars")

    assert response.status_code == 422
    assert error_of(response)["code"] == "unknown_region"
    assert context_of(error_of(response)) == {"regions": ["eu", "us"]}


# -- full, down, drained -----------------------------------------------------------------------


def test_the_nearest_full_region_is_passed_over_for_the_next(api: RegionsApi) -> None:
    assert [api.region_of(f"p{i}", location=PARIS) for i in range(3)] == ["eu"] * 3
    # Frankfurt holds 3 VMs: a fourth learner from Paris goes to Virginia.
    fourth = api.create("p3", location=PARIS)

    assert fourth.json["region"] == "us"
    assert fourth.json["region_reason"].startswith("nearest region eu is full; next nearest (")
    assert api.regions()["eu"]["vms_in_use"] == 3


def test_a_template_needs_room_for_all_its_vms(api: RegionsApi) -> None:
    assert api.region_of("p0", location=PARIS) == "eu"
    assert api.region_of("p1", location=PARIS) == "eu"
    # One VM left in Frankfurt: a two-VM kubernetes environment does not fit there.
    assert api.region_of("k", "kubernetes", location=PARIS) == "us"
    assert api.region_of("p2", location=PARIS) == "eu"


def test_a_full_explicit_region_is_503_with_retry_after(api: RegionsApi) -> None:
    for i in range(3):
        api.region_of(f"p{i}", region="eu")

    response = api.create("late", region="eu")

    assert response.status_code == 503
    assert error_of(response)["code"] == "region_full"
    assert error_of(response)["detail"] == "region eu is full"
    assert context_of(error_of(response)) == {
        "region": "eu",
        "regions": [{"region": "eu", "why": "full"}],
    }
    assert response.headers["Retry-After"] == str(FULL_RETRY_AFTER_SECONDS)


def test_room_comes_back_when_a_session_ends_not_when_it_is_closing(api: RegionsApi) -> None:
    ids = [api.create(f"p{i}", region="eu").json["id"] for i in range(3)]
    api.runtime.life.close(ids[0], CloseReason.DELETED)
    # Terminating: its VM still exists, so it still counts.
    assert api.create("late", region="eu").status_code == 503
    api.runtime.life.finish(ids[0])

    assert api.create("late", region="eu").status_code == 201


def test_a_down_region_is_passed_over_and_refused_when_named(api: RegionsApi) -> None:
    api.went_silent("eu")

    near_paris = api.create("paris", location=PARIS)
    named = api.create("eve", region="eu")
    no_hint = api.create("bob")

    assert near_paris.json["region"] == "us"
    assert near_paris.json["region_reason"].startswith("nearest region eu is down; next nearest")
    assert named.status_code == 503
    assert error_of(named)["code"] == "region_down"
    assert "Retry-After" not in named.headers
    assert (no_hint.json["region"], no_hint.json["region_reason"].split(";")[0]) == (
        "us",
        "default region eu is down",
    )


def test_a_region_no_worker_ever_reported_counts_as_up(api: RegionsApi) -> None:
    # A fresh Redis: workers have not reported yet. Creates queue as they always did.
    assert api.regions()["eu"]["alive"] is None
    assert api.region_of("alice", location=PARIS) == "eu"


def test_a_drained_region_takes_no_new_session(api: RegionsApi) -> None:
    assert api.region_of("before", location=PARIS) == "eu"
    assert api.drain("eu").status_code == 200

    moved = api.create("paris", location=PARIS)
    named = api.create("eve", region="eu")

    assert moved.json["region"] == "us"
    assert moved.json["region_reason"].startswith("nearest region eu is drained; next nearest")
    assert (named.status_code, error_of(named)["code"]) == (503, "region_drained")
    assert api.drain("eu", drained=False).status_code == 200
    assert api.region_of("after", location=PARIS) == "eu"


def test_no_region_left_is_503(api: RegionsApi) -> None:
    api.drain("us")
    api.went_silent("eu")

    response = api.create("paris", location=PARIS)

    assert response.status_code == 503
    assert error_of(response)["code"] == "no_region_available"
    assert error_of(response)["regions"] == [
        {"region": "eu", "why": "down"},
        {"region": "us", "why": "drained"},
    ]


def test_a_reconnect_keeps_the_session_where_it_is(api: RegionsApi) -> None:
    first = api.create("alice", region="us")

    again = api.create("alice", location=PARIS)

    assert again.status_code == 200
    assert again.json["reconnected"] is True
    assert (again.json["id"], again.json["region"]) == (first.json["id"], "us")
    assert again.json["region_reason"] == "reconnected to the user's session in us"


def test_a_session_missing_from_the_template_index_counts_as_the_largest_template(
    api: RegionsApi,
) -> None:
    session_id = api.create("old", region="eu").json["id"]
    # As stored before the per-template index existed (or of a template since removed).
    index = region_template_key("eu", "ubuntu", session_tag(session_id))
    api.redis.srem(index, session_id)

    assert api.regions()["eu"]["vms_in_use"] == len(TEMPLATES["kubernetes"].vms) == 2
    api.runtime.life.close(session_id, CloseReason.DELETED)
    api.runtime.life.finish(session_id)
    assert api.regions()["eu"]["vms_in_use"] == 0


# -- warm pools count -------------------------------------------------------------------------


def warm_up(pools: RedisPoolStore, key: PoolKey, count: int, *, ready: bool = True) -> None:
    envs = [new_warm_environment(key=key, now=NOW - 100) for _ in range(count)]
    reserved = pools.reserve(key, envs, ceiling=count, max_in_flight=count)
    if ready:
        for env in reserved:
            assert pools.mark_ready(key, env.id, vms=VMS, at=NOW - 50)


def test_warm_pools_count_towards_a_regions_load(pool_store: RedisPoolStore) -> None:
    api = RegionsApi(pool_store)
    warm_up(pool_store, PoolKey("eu", "kubernetes"), 1, ready=False)  # booting: 2 VMs
    assert api.regions()["eu"]["vms_in_use"] == 2
    assert api.region_of("p0", location=PARIS) == "eu"

    # 3 of 3 VMs in use: the next learner goes to Virginia.
    assert api.region_of("p1", location=PARIS) == "us"
    assert api.regions()["eu"]["vms_in_use"] == 3


def test_a_ready_warm_environment_is_room_enough(pool_store: RedisPoolStore) -> None:
    api = RegionsApi(pool_store)
    warm_up(pool_store, PoolKey("eu", "ubuntu"), 1)
    api.region_of("p0", region="eu")  # takes the warm one
    warm_up(pool_store, PoolKey("eu", "ubuntu"), 2)  # the pool refills past the capacity
    assert api.regions()["eu"]["vms_in_use"] == 3

    warm = api.create("p1", location=PARIS)

    assert (warm.json["region"], warm.json["warm"]) == ("eu", True)
    assert [t.name for t in api.celery.sent] == [BIND_ENVIRONMENT, BIND_ENVIRONMENT]


# -- the admin routes --------------------------------------------------------------------------


def test_admin_lists_every_region_with_its_state(api: RegionsApi) -> None:
    api.region_of("k", "kubernetes", location=PARIS)
    api.region_of("n", location=NEW_YORK)
    api.state.heartbeat(["eu"], ttl_seconds=60)
    api.drain("us")

    response = api.call("GET", "/v1/admin/regions", token=ADMIN)

    assert response.status_code == 200
    assert response.json == {
        "default_region": "eu",
        "regions": [
            {
                "region": "eu",
                "location": {"lat": 50.1, "lon": 8.7},
                "capacity_vms": 3,
                "vms_in_use": 2,
                "alive": True,
                "drained": False,
            },
            {
                "region": "us",
                "location": {"lat": 38.9, "lon": -77.0},
                "capacity_vms": 10,
                "vms_in_use": 1,
                "alive": None,
                "drained": True,
            },
        ],
    }


def test_draining_answers_the_region(api: RegionsApi) -> None:
    response = api.drain("us")

    assert response.status_code == 200
    assert response.json["region"] == "us"
    assert response.json["drained"] is True
    assert api.state.flags(["us"])["us"] == RegionFlags(alive=None, drained=True)
    assert api.drain("us", drained=False).json["drained"] is False
    assert api.drain("us", drained=False).json["drained"] is False  # idempotent


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/v1/admin/regions/mars", {"drained": True}, 404, "unknown_region"),
        ("/v1/admin/regions/eu", {"drained": "yes"}, 400, "invalid_request"),
        ("/v1/admin/regions/eu", {"drained": 1}, 400, "invalid_request"),
        ("/v1/admin/regions/eu", {}, 400, "invalid_request"),
        ("/v1/admin/regions/eu", {"drained": True, "paused": True}, 400, "invalid_request"),
    ],
)
def test_bad_region_updates_are_refused(
    api: RegionsApi, path: str, body: dict[str, Any], status: int, code: str
) -> None:
    response = api.call("PUT", path, token=ADMIN, json=body)

    assert (response.status_code, error_of(response)["code"]) == (status, code)
    assert api.state.flags(["eu"])["eu"].drained is False


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/v1/admin/regions"), ("PUT", "/v1/admin/regions/eu")]
)
def test_the_region_routes_need_an_admin_token(api: RegionsApi, method: str, path: str) -> None:
    response = api.call(method, path, token=FRONTEND, json={"drained": True})

    assert response.status_code == 403
    assert error_of(response)["code"] == "forbidden"
    assert api.state.flags(["eu"])["eu"].drained is False


# -- the workers' heartbeat --------------------------------------------------------------------


@dataclass
class Follower:
    region: str
    healthy: bool = True
    stopped: bool = False


def test_the_heartbeat_marks_healthy_regions_alive_for_three_intervals() -> None:
    client = fakeredis.FakeRedis()
    state = RedisRegionState(client)
    eu, us = Follower("eu"), Follower("us", healthy=False)
    heartbeat = RegionHeartbeat(state, [eu, us], interval=2.0)

    assert heartbeat.beat() == ["eu"]

    assert 5000 < client.pttl("labvirt:region:eu:alive") <= 6000
    flags = state.flags(["eu", "us", "ap"])
    # us was never reported: unknown, not down; once reported, silence is down.
    assert flags == {
        "eu": RegionFlags(alive=True, drained=False),
        "us": RegionFlags(alive=None, drained=False),
        "ap": RegionFlags(alive=None, drained=False),
    }
    client.delete("labvirt:region:eu:alive")
    assert state.flags(["eu"])["eu"].down


def test_the_heartbeat_loop_beats_until_its_followers_stop() -> None:
    client = fakeredis.FakeRedis()
    state = RedisRegionState(client)
    eu = Follower("eu")
    heartbeat = RegionHeartbeat(state, [eu], interval=0.05)
    heartbeat.start()
    try:
        deadline = time.monotonic() + 5
        while not client.exists("labvirt:region:eu:alive") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.exists("labvirt:region:eu:alive")
        eu.healthy = False  # the informer's list or watch fails: no more beats
        time.sleep(0.3)
        assert not client.exists("labvirt:region:eu:alive")
        eu.stopped = True
        deadline = time.monotonic() + 5
        while heartbeat_alive(heartbeat) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not heartbeat_alive(heartbeat)
    finally:
        heartbeat.stop()


def heartbeat_alive(heartbeat: RegionHeartbeat) -> bool:
    return any(t.name == "region-heartbeat" and t.is_alive() for t in threading.enumerate())
