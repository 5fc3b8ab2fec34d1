"""Warm pools through the HTTP API: the create path's claim and the admin endpoints.

Sessions live in fakeredis; the pools in the real Redis (their claim is a Lua script), under a
key prefix of each test's own.
"""

from __future__ import annotations

from typing import Any

import fakeredis
import pytest
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.test import TestResponse

from services.api.app import create_app
from shared.adapters.pool_store import RedisPoolStore
from shared.adapters.session_store import RedisSessionStore
from shared.adapters.template_files import load_templates
from shared.config import Cluster, Mode, Settings
from shared.domain.pools.config import PoolConfig, PoolKey, PoolMode
from shared.domain.pools.environments import new_warm_environment
from shared.domain.sessions import SessionState, VmView
from shared.jobs import BIND_ENVIRONMENT, PROVISION, PROVISION_QUEUE
from shared.runtime import Runtime
from tests.doubles import RecordingCelery
from tests.unit.test_api import error_of

FRONTEND = "frontend-3f786850e387550fdab836ed7e6dc881"  # strong, as the start-up check wants
ADMIN = "admin-e9d71f5ee7c92d6dc9e92ffdad17b8bd"
NOW = 1_700_000_000.0
TEMPLATES = load_templates(None)
UBUNTU = PoolKey("local", "ubuntu")
VMS = [VmView(name="ubuntu", hostname="ubuntu", ip="10.244.1.7", phase="Running", ready=True)]


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


class PoolsApi:
    def __init__(self, pools: RedisPoolStore | None) -> None:
        self.redis = fakeredis.FakeRedis()
        self.sessions = RedisSessionStore(self.redis)
        self.celery = RecordingCelery()
        self.clock = Clock()
        self.pools = pools
        runtime = Runtime(
            settings=Settings(
                mode=Mode.DEV,
                frontend_tokens=frozenset({FRONTEND}),
                admin_tokens=frozenset({ADMIN}),
                clusters=(
                    Cluster("local", None, None, "default"),
                    Cluster("eu", None, None, "default"),
                ),
            ),
            redis=self.redis,
            sessions=self.sessions,
            templates=TEMPLATES,
            celery=self.celery,  # type: ignore[arg-type]
            clock=self.clock,
            pools=pools,
        )
        self.client: FlaskClient = create_app(runtime).test_client()

    def call(self, method: str, path: str, *, token: str | None = ADMIN, **kw: Any) -> TestResponse:
        headers = dict(kw.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        response = self.client.open(path, method=method, headers=headers, **kw)
        assert response.status_code != 500, response.get_data(as_text=True)
        assert response.is_json, response.get_data(as_text=True)
        return response

    def put(self, path: str, body: Any, **kw: Any) -> TestResponse:
        return self.call("PUT", path, json=body, **kw)

    def pools_view(self) -> dict[tuple[str, str], dict[str, Any]]:
        response = self.call("GET", "/v1/admin/pools")
        assert response.status_code == 200, response.json
        return {(p["region"], p["template"]): p for p in response.json["pools"]}

    def warm_up(self, count: int, *, key: PoolKey = UBUNTU, at: float = NOW - 3000) -> list[str]:
        assert self.pools is not None
        envs = [new_warm_environment(key=key, now=at) for _ in range(count)]
        reserved = self.pools.reserve(key, envs, ceiling=count, max_in_flight=count)
        for env in reserved:
            assert self.pools.mark_ready(key, env.id, vms=VMS, at=at + 30)
        return [env.id for env in reserved]


@pytest.fixture
def api(pool_store: RedisPoolStore) -> PoolsApi:
    return PoolsApi(pool_store)


# -- the create path -------------------------------------------------------------------------


def test_a_create_takes_a_warm_environment_ready_at_once(api: PoolsApi) -> None:
    [env_id] = api.warm_up(1)
    response = api.call(
        "POST", "/v1/sessions", token=FRONTEND, json={"template": "ubuntu", "user": "alice"}
    )
    assert response.status_code == 201, response.json
    body = response.json
    assert (body["state"], body["warm"]) == ("ready", True)
    assert body["vms"] == [vm.to_dict() for vm in VMS]
    stored = api.sessions.require(body["id"])
    assert stored.environment_id == env_id
    assert stored.state is SessionState.READY
    # The clocks start at the claim, not when the environment booted 50 minutes ago.
    lifetime = TEMPLATES["ubuntu"].max_lifetime_seconds
    assert (stored.created_at, stored.expires_at, stored.last_seen_at) == (
        NOW,
        NOW + lifetime,
        NOW,
    )
    assert [h.state for h in stored.history] == [SessionState.PROVISIONING, SessionState.READY]
    assert [(s.name, s.payload, s.queue) for s in api.celery.sent] == [
        (BIND_ENVIRONMENT, {"session_id": body["id"]}, PROVISION_QUEUE)
    ]
    assert api.pools is not None
    claimed = api.pools.environment(env_id)
    assert claimed is not None
    assert claimed.session_id == body["id"]


def test_a_miss_goes_cold_at_once_and_counts_against_the_hit_rate(api: PoolsApi) -> None:
    api.warm_up(1)
    first = api.call(
        "POST", "/v1/sessions", token=FRONTEND, json={"template": "ubuntu", "user": "ann"}
    )
    second = api.call(
        "POST", "/v1/sessions", token=FRONTEND, json={"template": "ubuntu", "user": "bob"}
    )
    assert (first.json["warm"], second.json["warm"]) == (True, False)
    assert second.json["state"] == "provisioning"
    assert [s.name for s in api.celery.sent] == [BIND_ENVIRONMENT, PROVISION]
    assert api.pools_view()[("local", "ubuntu")]["hit_rate_1h"] == 0.5


def test_pools_are_per_region_and_template(api: PoolsApi) -> None:
    api.warm_up(1, key=PoolKey("eu", "ubuntu"))
    local = api.call(
        "POST", "/v1/sessions", token=FRONTEND, json={"template": "ubuntu", "user": "ann"}
    )
    kube = api.call(
        "POST",
        "/v1/sessions",
        token=FRONTEND,
        json={"template": "kubernetes", "user": "bob", "region": "eu"},
    )
    eu = api.call(
        "POST",
        "/v1/sessions",
        token=FRONTEND,
        json={"template": "ubuntu", "user": "cid", "region": "eu"},
    )
    assert [r.json["warm"] for r in (local, kube, eu)] == [False, False, True]


def test_without_a_pool_store_every_create_is_cold_and_admin_says_so() -> None:
    api = PoolsApi(None)
    response = api.call(
        "POST", "/v1/sessions", token=FRONTEND, json={"template": "ubuntu", "user": "alice"}
    )
    assert (response.status_code, response.json["warm"]) == (201, False)
    unavailable = api.call("GET", "/v1/admin/pools")
    assert unavailable.status_code == 503
    assert error_of(unavailable)["code"] == "unavailable"


# -- the admin endpoints ---------------------------------------------------------------------


def test_admin_lists_every_pool_of_every_region(api: PoolsApi) -> None:
    api.warm_up(2)
    assert api.pools is not None
    api.pools.reserve(
        UBUNTU, [new_warm_environment(key=UBUNTU, now=NOW)], ceiling=3, max_in_flight=3
    )
    response = api.call("GET", "/v1/admin/pools")
    assert response.status_code == 200
    assert response.json["paused"] is False
    pools = {(p["region"], p["template"]): p for p in response.json["pools"]}
    assert set(pools) == {(r, t) for r in ("local", "eu") for t in ("ubuntu", "kubernetes")}
    ubuntu = pools[("local", "ubuntu")]
    assert {k: ubuntu[k] for k in ubuntu if k != "config"} == {
        "template": "ubuntu",
        "region": "local",
        "mode": "static",
        "target": 0,
        "ready": 2,
        "in_flight": 1,
        "paused": False,
        "hit_rate_1h": None,
    }


@pytest.mark.parametrize(("token", "status"), [(None, 401), ("x" * 20, 401), (FRONTEND, 403)])
def test_admin_needs_the_admin_token(api: PoolsApi, token: str | None, status: int) -> None:
    for method, path, body in (
        ("GET", "/v1/admin/pools", None),
        ("PUT", "/v1/admin/pools", {"paused": True}),
        ("PUT", "/v1/admin/pools/ubuntu", {"size": 3}),
    ):
        response = api.call(method, path, token=token, json=body)
        assert response.status_code == status, (method, path)
    assert api.pools_view()[("local", "ubuntu")]["target"] == 0


def test_a_size_makes_a_static_pool(api: PoolsApi) -> None:
    response = api.put("/v1/admin/pools/ubuntu", {"size": 10})
    assert response.status_code == 200, response.json
    assert (response.json["mode"], response.json["target"], response.json["region"]) == (
        "static",
        10,
        "local",
    )
    assert api.pools_view()[("eu", "ubuntu")]["target"] == 0
    assert api.pools is not None
    assert api.pools.config(UBUNTU, default=PoolConfig()) == PoolConfig(size=10)


def test_adaptive_bounds_and_hit_rate(api: PoolsApi) -> None:
    response = api.put(
        "/v1/admin/pools/kubernetes?region=eu",
        {"mode": "adaptive", "min": 2, "max": 20, "hit_rate": 0.9},
    )
    assert response.status_code == 200, response.json
    body = response.json
    assert (body["region"], body["mode"], body["target"]) == ("eu", "adaptive", 2)
    assert body["config"] == {
        "mode": "adaptive",
        "size": 0,
        "min": 2,
        "max": 20,
        "hit_rate": 0.9,
        "paused": False,
    }
    # Bounds alone change an adaptive pool; a size makes it static again.
    assert (
        api.put("/v1/admin/pools/kubernetes", {"max": 5, "region": "eu"}).json["config"]["max"] == 5
    )
    assert api.put("/v1/admin/pools/kubernetes?region=eu", {"size": 1}).json["mode"] == "static"


def test_one_pool_or_all_of_them_can_be_paused(api: PoolsApi) -> None:
    assert api.put("/v1/admin/pools/ubuntu", {"paused": True}).json["paused"] is True
    views = api.pools_view()
    assert views[("local", "ubuntu")]["paused"] is True
    assert views[("local", "kubernetes")]["paused"] is False
    everything = api.put("/v1/admin/pools", {"paused": True})
    assert everything.status_code == 200
    assert everything.json["paused"] is True
    assert all(p["paused"] for p in everything.json["pools"])
    api.put("/v1/admin/pools", {"paused": False})
    api.put("/v1/admin/pools/ubuntu", {"paused": False})
    assert not any(p["paused"] for p in api.pools_view().values())


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/v1/admin/pools/ubuntu", {}, 400, "invalid_request"),
        ("/v1/admin/pools/ubuntu", {"size": -1}, 400, "invalid_request"),
        ("/v1/admin/pools/ubuntu", {"size": 1001}, 400, "invalid_request"),
        ("/v1/admin/pools/ubuntu", {"size": "3"}, 400, "invalid_request"),
        ("/v1/admin/pools/ubuntu", {"size": 2.5}, 400, "invalid_request"),
        ("/v1/admin/pools/ubuntu", {"size": True}, 400, "invalid_request"),
        ("/v1/admin/pools/ubuntu", {"size": 3, "min": 1}, 400, "invalid_request"),
        ("/v1/admin/pools/ubuntu", {"mode": "static", "min": 1}, 400, "invalid_request"),
        ("/v1/admin/pools/ubuntu", {"mode": "adaptive", "size": 3}, 400, "invalid_request"),
        (
            "/v1/admin/pools/ubuntu",
            {"mode": "adaptive", "min": 9, "max": 3},
            400,
            "invalid_request",
        ),
        ("/v1/admin/pools/ubuntu", {"mode": "huge"}, 400, "invalid_request"),
        ("/v1/admin/pools/ubuntu", {"hit_rate": 1.5}, 400, "invalid_request"),
        ("/v1/admin/pools/ubuntu", {"paused": "yes"}, 400, "invalid_request"),
        ("/v1/admin/pools/ubuntu", {"colour": "red"}, 400, "invalid_request"),
        ("/v1/admin/pools/ubuntu", [1, 2], 400, "invalid_request"),
        ("/v1/admin/pools/nosuch", {"size": 1}, 404, "unknown_template"),
        ("/v1/admin/pools/ubuntu", {"size": 1, "region": "mars"}, 422, "unknown_region"),
        (
            "/v1/admin/pools/ubuntu?region=eu",
            {"size": 1, "region": "local"},
            400,
            "invalid_request",
        ),
        ("/v1/admin/pools", {}, 400, "invalid_request"),
        ("/v1/admin/pools", {"paused": 1}, 400, "invalid_request"),
    ],
)
def test_bad_changes_are_refused_with_json(
    api: PoolsApi, path: str, body: Any, status: int, code: str
) -> None:
    response = api.put(path, body)
    assert response.status_code == status, response.json
    assert error_of(response)["code"] == code
    assert api.pools_view()[("local", "ubuntu")]["config"] == PoolConfig().to_dict()


def test_a_body_that_is_not_json_is_refused(api: PoolsApi) -> None:
    response = api.call("PUT", "/v1/admin/pools/ubuntu", data="size=3")
    assert response.status_code == 415
    response = api.call(
        "PUT", "/v1/admin/pools/ubuntu", data="{", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=6,
)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.dictionaries(
        st.sampled_from(["size", "mode", "min", "max", "hit_rate", "paused", "region", "x"]),
        json_values,
        max_size=4,
    )
)
def test_no_pool_change_ever_answers_500(api: PoolsApi, body: dict[str, Any]) -> None:
    response = api.put("/v1/admin/pools/ubuntu", body)
    assert response.status_code in (200, 400, 422)
    if response.status_code == 200:
        config = PoolConfig.from_dict(response.json["config"])
        assert config.mode in PoolMode
