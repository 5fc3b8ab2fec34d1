"""The API's request rate limits: creates per learner and per frontend token, browser calls per
client address. Everything lives in the suite's real Redis (the limiter is a Lua script); the
clock is a fake one, so no test waits for a window to pass."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable
from typing import Any

import pytest
import redis
from werkzeug.test import TestResponse

from services.api.app import create_app
from services.api.limits import BROWSER_ENDPOINTS
from shared.adapters.rate_limits import RateLimiter
from shared.adapters.redis_server import free_port
from shared.adapters.session_store import RedisSessionStore
from shared.config_limits import Limits, Rate
from shared.runtime import Runtime
from tests.doubles import RecordingCelery
from tests.unit.test_api import ADMIN, FRONTEND, TEMPLATES, FakeClock, make_settings

OFF = Limits(creates_per_user=None, creates_per_frontend_token=None, browser_per_ip=None)
PROXY = "10.0.0.2"
LEARNER = "203.0.113.5"
Connect = Callable[[], redis.Redis]


class LimitedApi:
    def __init__(self, client: redis.Redis, limits: Limits, *, limiter: RateLimiter | None = None):
        self.clock = FakeClock()
        self.celery = RecordingCelery()
        self.runtime = Runtime(
            settings=dataclasses.replace(make_settings(), limits=limits),
            redis=client,
            sessions=RedisSessionStore(client),
            templates=TEMPLATES,
            celery=self.celery,  # type: ignore[arg-type]
            clock=self.clock,
            rate_limiter=limiter if limiter is not None else RateLimiter(client),
        )
        self.client = create_app(self.runtime).test_client()

    def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = FRONTEND,
        peer: str = LEARNER,
        forwarded_for: str | None = None,
        **kw: Any,
    ) -> TestResponse:
        headers = {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if forwarded_for is not None:
            headers["X-Forwarded-For"] = forwarded_for
        response = self.client.open(
            path, method=method, headers=headers, environ_base={"REMOTE_ADDR": peer}, **kw
        )
        assert response.status_code != 500, response.get_data(as_text=True)
        return response

    def create(self, user: str, *, token: str = FRONTEND, template: str = "ubuntu") -> TestResponse:
        return self.call(
            "POST", "/v1/sessions", token=token, json={"template": template, "user": user}
        )

    def open_session(self, user: str = "alice") -> tuple[str, str]:
        response = self.create(user)
        assert response.status_code == 201, response.json
        return response.json["id"], response.json["token"]


def assert_rate_limited(
    response: TestResponse, *, scope: str, limit: str, retry_after: int
) -> dict[str, Any]:
    assert response.status_code == 429, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    assert response.headers["Retry-After"] == str(retry_after)
    problem: dict[str, Any] = response.json
    assert problem["type"] == "urn:labvirt:problem:rate_limited"
    assert problem["status"] == 429
    assert problem["code"] == "rate_limited"
    assert problem["scope"] == scope
    assert problem["limit"] == limit
    assert f"retry in {retry_after} s" in problem["detail"]
    return problem


def test_the_create_after_the_users_limit_is_a_429_with_retry_after(connect: Connect) -> None:
    api = LimitedApi(connect(), dataclasses.replace(OFF, creates_per_user=Rate(3, 60.0)))
    # A first create, then reconnects (page reloads): each one counts.
    statuses = []
    for _ in range(3):
        statuses.append(api.create("alice").status_code)
        api.clock.advance(1)

    refused = api.create("alice")

    assert statuses == [201, 200, 200]
    problem = assert_rate_limited(refused, scope="user", limit="3/60s", retry_after=57)
    assert "alice" not in problem["detail"]
    assert api.create("bob").status_code == 201
    api.clock.advance(57)
    assert api.create("alice").status_code == 200


def test_creates_are_limited_per_frontend_token(connect: Connect) -> None:
    client = connect()
    api = LimitedApi(client, dataclasses.replace(OFF, creates_per_frontend_token=Rate(2, 60.0)))
    assert api.create("alice").status_code == 201
    assert api.create("bob").status_code == 201

    assert_rate_limited(api.create("carol"), scope="frontend_token", limit="2/60s", retry_after=60)
    # Admins are not limited as a frontend token.
    assert api.create("carol", token=ADMIN).status_code == 201
    assert FRONTEND.encode() not in b"".join(client.keys("*"))


def test_a_create_by_an_admin_still_counts_for_the_learner(connect: Connect) -> None:
    api = LimitedApi(connect(), dataclasses.replace(OFF, creates_per_user=Rate(1, 60.0)))
    assert api.create("alice", token=ADMIN).status_code == 201

    assert_rate_limited(
        api.create("alice", token=ADMIN), scope="user", limit="1/60s", retry_after=60
    )


def test_a_learner_over_their_limit_spends_nothing_of_the_frontends(connect: Connect) -> None:
    limits = dataclasses.replace(
        OFF, creates_per_user=Rate(1, 60.0), creates_per_frontend_token=Rate(2, 60.0)
    )
    api = LimitedApi(connect(), limits)
    assert api.create("alice").status_code == 201
    for _ in range(5):
        assert api.create("alice").status_code == 429

    assert api.create("bob").status_code == 201
    assert_rate_limited(api.create("carol"), scope="frontend_token", limit="2/60s", retry_after=60)


def test_only_valid_creates_count(connect: Connect) -> None:
    api = LimitedApi(connect(), dataclasses.replace(OFF, creates_per_frontend_token=Rate(1, 60.0)))
    assert api.call("POST", "/v1/sessions", json={"user": "alice"}).status_code == 400
    assert api.create("alice", template="no-such-template").status_code == 422
    assert api.create("not a valid user!").status_code == 400

    assert api.create("alice").status_code == 201


BROWSER_CALLS = [
    ("POST", "/v1/sessions/{id}/heartbeat"),
    ("POST", "/v1/sessions/{id}/extend"),
    ("POST", "/v1/sessions/{id}/tickets"),
    ("POST", "/v1/sessions/{id}/close"),
]


def test_the_browser_calls_are_the_limited_endpoints(connect: Connect) -> None:
    routes = LimitedApi(connect(), OFF).client.application.url_map.bind("localhost")
    endpoints = {
        routes.match(path.format(id="s-" + "0" * 24), method=method)[0]
        for method, path in BROWSER_CALLS
    }
    assert endpoints == BROWSER_ENDPOINTS


@pytest.mark.parametrize(("method", "path"), BROWSER_CALLS)
def test_each_browser_call_is_limited_per_client_address(
    connect: Connect, method: str, path: str
) -> None:
    api = LimitedApi(connect(), dataclasses.replace(OFF, browser_per_ip=Rate(1, 60.0)))
    session_id, token = api.open_session()
    url = path.format(id=session_id)
    assert api.call(method, url, token=token).status_code in (200, 201, 202)

    refused = api.call(method, url, token=token)

    assert_rate_limited(refused, scope="client_ip", limit="1/60s", retry_after=60)
    assert api.call(method, url, token=token, peer="203.0.113.6").status_code in (200, 201, 202)


def test_browser_calls_share_one_count_and_leave_other_routes_alone(connect: Connect) -> None:
    api = LimitedApi(connect(), dataclasses.replace(OFF, browser_per_ip=Rate(3, 60.0)))
    session_id, token = api.open_session()
    for _ in range(5):  # neither creates nor reads are browser calls
        assert api.call("GET", f"/v1/sessions/{session_id}", token=token).status_code == 200
    assert api.call("POST", f"/v1/sessions/{session_id}/heartbeat", token=token).status_code == 200
    assert api.call("POST", f"/v1/sessions/{session_id}/tickets", token=token).status_code == 201
    # Unauthenticated knocking counts too: the limit comes before the credentials.
    assert api.call("POST", f"/v1/sessions/{session_id}/extend", token=None).status_code == 401

    refused = api.call("POST", f"/v1/sessions/{session_id}/close", token=token)

    assert_rate_limited(refused, scope="client_ip", limit="3/60s", retry_after=60)
    assert api.call("GET", f"/v1/sessions/{session_id}", token=token).status_code == 200
    api.clock.advance(60)
    assert api.call("POST", f"/v1/sessions/{session_id}/close", token=token).status_code == 202


def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_count(connect: Connect) -> None:
    limits = dataclasses.replace(
        OFF,
        browser_per_ip=Rate(1, 60.0),
        trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"),),
    )
    api = LimitedApi(connect(), limits)
    session_id, token = api.open_session()
    url = f"/v1/sessions/{session_id}/heartbeat"

    def beat(forwarded_for: str) -> int:
        return api.call(
            "POST", url, token=token, peer=PROXY, forwarded_for=forwarded_for
        ).status_code

    assert beat("198.51.100.7") == 200
    assert beat("198.51.100.8") == 200
    assert beat("2001:db8::1") == 200
    assert beat("198.51.100.7") == 429
    # What a client claims left of the proxy's own entry is not believed.
    assert beat("192.0.2.1, 198.51.100.7") == 429


def test_forwarded_for_from_an_untrusted_peer_is_ignored(connect: Connect) -> None:
    limits = dataclasses.replace(
        OFF,
        browser_per_ip=Rate(2, 60.0),
        trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"),),
    )
    api = LimitedApi(connect(), limits)
    session_id, token = api.open_session()
    url = f"/v1/sessions/{session_id}/heartbeat"

    statuses = [
        api.call("POST", url, token=token, peer=LEARNER, forwarded_for=spoofed).status_code
        for spoofed in ("198.51.100.1", "198.51.100.2", "198.51.100.3")
    ]

    assert statuses == [200, 200, 429]


def test_off_limits_check_nothing(connect: Connect) -> None:
    client = connect()
    api = LimitedApi(client, OFF)
    session_id, token = api.open_session()
    for _ in range(20):
        assert api.create("alice").status_code == 200
        assert (
            api.call("POST", f"/v1/sessions/{session_id}/heartbeat", token=token).status_code == 200
        )
    assert not client.keys("labvirt:rate:*")


def test_an_unreachable_limiter_is_a_503_not_a_free_pass(connect: Connect) -> None:
    down = redis.Redis(port=free_port(), socket_connect_timeout=1)
    api = LimitedApi(connect(), Limits(), limiter=RateLimiter(down))

    response = api.create("alice")

    assert response.status_code == 503
    assert response.json["code"] == "unavailable"
    assert api.celery.sent == []  # nothing was provisioned
