"""The operators' dashboard (``/ui/ops``) through Flask's test client, over the suite's Redis.

Signing in keeps the admin token on the server (a random id in an HttpOnly, SameSite=Strict
cookie; Secure over https and in production); every form that changes something needs the
sign-in's CSRF token; the actions run the admin API's rules (the pool budget, a requeue queued
once) and show refusals on the page.
"""

from __future__ import annotations

import dataclasses
import html
import re
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from services.api.app import create_app
from shared.adapters.dead_letters import Status
from shared.adapters.operator_sessions import LIFETIME_SECONDS, PREFIX
from shared.adapters.pool_store import RedisPoolStore
from shared.adapters.rate_limits import RateLimiter
from shared.adapters.session_store import RedisSessionStore
from shared.config import ConfigError, Mode, Settings
from shared.config_limits import Limits, Rate
from shared.domain.lifecycle import clocks_for, start_session
from shared.domain.pools.config import PoolKey
from shared.domain.sessions import VmView
from shared.jobs import TEARDOWN
from shared.runtime import Runtime
from tests.conftest import flush_database
from tests.doubles import RecordingCelery
from tests.unit.test_api import ADMIN, FRONTEND, TEMPLATES, FakeClock, make_settings

PAGE = "/ui/ops"
COOKIE = "labvirt_ops"
CSRF = re.compile(r'name="csrf" value="([^"]+)"')
VM = VmView(name="ubuntu", hostname="ubuntu", ip="10.0.0.2", phase="Running", ready=True)


class Dashboard:
    """One API app over real Redis, and a browser-like client of its dashboard."""

    def __init__(self, redis_url: str, settings: Settings | None = None) -> None:
        self.redis = redis.Redis.from_url(redis_url)
        self.clock = FakeClock()
        self.celery = RecordingCelery()
        self.settings = settings or make_settings()
        self.runtime = Runtime(
            settings=self.settings,
            redis=self.redis,
            sessions=RedisSessionStore(self.redis),
            templates=TEMPLATES,
            celery=self.celery,  # type: ignore[arg-type]
            clock=self.clock,
            pools=RedisPoolStore(self.redis),
            rate_limiter=RateLimiter(self.redis),
        )
        self.client: FlaskClient = create_app(self.runtime).test_client()

    def sign_in(self, token: str = ADMIN, operator: str = "ann", **kw: Any) -> TestResponse:
        return self.client.post(
            f"{PAGE}/sign-in", data={"token": token, "operator": operator}, **kw
        )

    def page(self) -> TestResponse:
        response = self.client.get(PAGE)
        assert response.status_code == 200, response.get_data(as_text=True)
        return response

    def csrf(self) -> str:
        found = CSRF.search(self.page().get_data(as_text=True))
        assert found is not None, "the page has no form with a CSRF token"
        return found.group(1)

    def post(self, path: str, form: dict[str, str], *, csrf: str | None = None) -> TestResponse:
        data = dict(form)
        data["csrf"] = self.csrf() if csrf is None else csrf
        return self.client.post(PAGE + path, data=data)

    def pool(self, template: str = "ubuntu") -> Any:
        assert self.runtime.pools is not None
        return self.runtime.pools.config(
            PoolKey("local", template), default=TEMPLATES[template].pool
        )

    def cookie(self) -> str | None:
        cookie = self.client.get_cookie(COOKIE, path=PAGE)
        return None if cookie is None else cookie.value


@pytest.fixture
def ops(redis_url: str) -> Iterator[Dashboard]:
    flush_database(redis_url)
    made = Dashboard(redis_url)
    yield made
    made.redis.close()
    flush_database(redis_url)


def text(response: TestResponse) -> str:
    """The page's words, tags and extra spaces gone (what the operator reads)."""
    words = re.sub(r"<[^>]+>", " ", response.get_data(as_text=True))
    return " ".join(html.unescape(words).split())


def notice(response: TestResponse) -> str:
    found = re.search(r'id="notice"[^>]*>([^<]*)<', response.get_data(as_text=True))
    assert found is not None, text(response)
    return html.unescape(found.group(1)).strip()


def every_value_in_redis(client: redis.Redis) -> str:
    dumped = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        dumped.append(key.decode())
        if kind == b"string":
            dumped.append(client.get(key).decode(errors="replace"))  # type: ignore[union-attr]
        elif kind == b"hash":
            dumped += [f"{k!r}={v!r}" for k, v in client.hgetall(key).items()]
    return "\n".join(dumped)


# -- signing in ------------------------------------------------------------------------------


def test_the_page_asks_for_the_admin_token_first(ops: Dashboard) -> None:
    response = ops.page()

    assert response.mimetype == "text/html"
    assert "Admin token" in text(response)
    assert 'type="password" name="token"' in response.get_data(as_text=True)
    assert not CSRF.search(response.get_data(as_text=True))
    assert "Warm pools" not in text(response)
    assert response.headers["Cache-Control"] == "no-store"
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]


def test_signing_in_keeps_the_token_on_the_server(ops: Dashboard) -> None:
    response = ops.sign_in()

    assert response.status_code == 303
    assert response.headers["Location"] == PAGE
    (set_cookie,) = response.headers.getlist("Set-Cookie")
    attributes = [part.strip().lower() for part in set_cookie.split(";")]
    assert "httponly" in attributes
    assert "samesite=strict" in attributes
    assert f"path={PAGE}" in attributes
    assert "secure" not in attributes  # dev mode, plain http
    assert f"max-age={LIFETIME_SECONDS}" in attributes
    session_id = ops.cookie()
    assert session_id is not None
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", session_id)
    assert ADMIN not in set_cookie
    assert ADMIN not in response.headers["Location"]
    stored = every_value_in_redis(ops.redis)
    assert ADMIN not in stored
    assert session_id not in stored  # Redis keeps a hash of the id, not the id
    (key,) = list(ops.redis.scan_iter(match=f"{PREFIX}:*"))
    assert 0 < ops.redis.ttl(key) <= LIFETIME_SECONDS

    page = ops.page()
    assert "Warm pools" in text(page)
    assert "signed in: ann (admin " in text(page)


@pytest.mark.parametrize(
    ("mode", "base_url", "secure"),
    [
        (Mode.DEV, "http://localhost", False),
        (Mode.DEV, "https://localhost", True),
        (Mode.PRODUCTION, "http://localhost", True),
    ],
)
def test_the_cookie_is_secure_over_https_and_in_production(
    redis_url: str, mode: Mode, base_url: str, secure: bool
) -> None:
    flush_database(redis_url)
    ops = Dashboard(redis_url, dataclasses.replace(make_settings(), mode=mode))
    try:
        response = ops.sign_in(base_url=base_url)

        assert response.status_code == 303
        attributes = [p.strip().lower() for p in response.headers["Set-Cookie"].split(";")]
        assert ("secure" in attributes) is secure
    finally:
        ops.redis.close()
        flush_database(redis_url)


@pytest.mark.parametrize(
    ("token", "status", "message"),
    [
        ("", 400, "Enter an admin token."),
        ("wrong-" + "x" * 30, 401, "That is not an admin token."),
        (FRONTEND, 401, "That is not an admin token."),
    ],
    ids=["empty", "unknown", "frontend token"],
)
def test_a_wrong_token_gets_the_form_again_with_a_message(
    ops: Dashboard, token: str, status: int, message: str
) -> None:
    response = ops.sign_in(token)

    assert response.status_code == status
    assert notice(response) == message
    assert 'name="token"' in response.get_data(as_text=True)
    assert "Set-Cookie" not in response.headers
    assert not list(ops.redis.scan_iter(match=f"{PREFIX}:*"))


def test_sign_ins_are_limited_per_address(redis_url: str) -> None:
    flush_database(redis_url)
    limits = Limits(sign_ins_per_ip=Rate(2, 3600.0))
    ops = Dashboard(redis_url, dataclasses.replace(make_settings(), limits=limits))
    try:
        assert ops.sign_in("wrong-" + "x" * 30).status_code == 401
        assert ops.sign_in().status_code == 303
        refused = ops.sign_in()  # the right token, but the third try in the hour

        assert refused.status_code == 429
        assert 1 <= int(refused.headers["Retry-After"]) <= 3600
        assert notice(refused).startswith("Too many requests for this client address")
        other = ops.client.post(
            f"{PAGE}/sign-in",
            data={"token": ADMIN},
            environ_base={"REMOTE_ADDR": "10.1.2.3"},
        )
        assert other.status_code == 303  # another address has its own count
    finally:
        ops.redis.close()
        flush_database(redis_url)


def test_the_sign_in_limit_comes_from_the_environment() -> None:
    def limit(**env: str) -> Rate | None:
        return Settings.from_env({"LABVIRT_MODE": "dev", **env}).limits.sign_ins_per_ip

    assert limit() == Rate(10, 60.0)
    assert limit(LABVIRT_LIMIT_SIGN_INS_PER_IP="3/hour") == Rate(3, 3600.0)
    assert limit(LABVIRT_LIMIT_SIGN_INS_PER_IP="off") is None
    with pytest.raises(ConfigError, match="LABVIRT_LIMIT_SIGN_INS_PER_IP"):
        limit(LABVIRT_LIMIT_SIGN_INS_PER_IP="lots")


def test_a_bearer_token_opens_nothing_on_the_dashboard(ops: Dashboard) -> None:
    bearer = {"Authorization": f"Bearer {ADMIN}"}

    page = ops.client.get(PAGE, headers=bearer)
    resize = ops.client.post(
        f"{PAGE}/pools/ubuntu/size", data={"size": "3", "region": "local"}, headers=bearer
    )

    assert "Admin token" in text(page)
    assert resize.status_code == 401
    assert notice(resize).startswith("Sign in to do that")
    assert ops.pool().size == TEMPLATES["ubuntu"].pool.size


def test_signing_out_deletes_the_record_and_the_cookie(ops: Dashboard) -> None:
    ops.sign_in()
    session_id = ops.cookie()
    csrf = ops.csrf()

    response = ops.post("/sign-out", {}, csrf=csrf)

    assert response.status_code == 303
    assert ops.cookie() is None
    assert not list(ops.redis.scan_iter(match=f"{PREFIX}:*"))
    assert "Admin token" in text(ops.page())
    # The old cookie and form are worth nothing now.
    ops.client.set_cookie(COOKIE, session_id or "", path=PAGE)
    replayed = ops.post("/pools/ubuntu/size", {"size": "2", "region": "local"}, csrf=csrf)
    assert replayed.status_code == 401


def test_a_withdrawn_admin_token_ends_its_sign_ins(ops: Dashboard, redis_url: str) -> None:
    ops.sign_in()
    session_id = ops.cookie()
    rotated = dataclasses.replace(make_settings(), admin_tokens=frozenset({"admin-" + "9" * 32}))
    after = Dashboard(redis_url, rotated)
    after.client.set_cookie(COOKIE, session_id or "", path=PAGE)

    assert "Admin token" in text(after.page())
    assert not list(ops.redis.scan_iter(match=f"{PREFIX}:*"))


# -- CSRF ------------------------------------------------------------------------------------


@pytest.mark.parametrize("csrf", ["", "forged-" + "x" * 36], ids=["missing", "forged"])
def test_a_form_without_the_sign_ins_csrf_token_changes_nothing(ops: Dashboard, csrf: str) -> None:
    ops.sign_in()

    for path, form in [
        ("/pools/ubuntu/size", {"size": "3", "region": "local"}),
        ("/pools/ubuntu/paused", {"paused": "true", "region": "local"}),
        ("/pools", {"paused": "true"}),
        ("/sign-out", {}),
    ]:
        response = ops.post(path, form, csrf=csrf)
        assert response.status_code == 403, path
        assert "nothing changed" in notice(response), path

    assert ops.pool().size == TEMPLATES["ubuntu"].pool.size
    assert not ops.pool().paused
    assert ops.runtime.pools is not None
    assert not ops.runtime.pools.globally_paused()
    assert ops.cookie() is not None  # still signed in


def test_another_sign_ins_csrf_token_does_not_pass(ops: Dashboard, redis_url: str) -> None:
    other = Dashboard(redis_url)
    other.sign_in(operator="bob")
    ops.sign_in()

    response = ops.post("/pools/ubuntu/size", {"size": "3", "region": "local"}, csrf=other.csrf())

    assert response.status_code == 403
    assert ops.pool().size == TEMPLATES["ubuntu"].pool.size


# -- actions ---------------------------------------------------------------------------------


def test_resizing_a_pool_goes_through_the_admin_rules(ops: Dashboard) -> None:
    ops.sign_in()

    done = ops.post("/pools/ubuntu/size", {"size": "2", "region": "local"})

    assert done.status_code == 303
    assert done.headers["Location"] == PAGE
    assert ops.pool().size == 2
    page = ops.page()
    assert notice(page) == "The ubuntu pool of local now aims at 2 ready."
    row = re.search(r'data-pool="local/ubuntu".*?</tr>', page.get_data(as_text=True), re.S)
    assert row is not None
    assert re.search(r'class="num target">2<', row.group(0))
    assert "The ubuntu pool" not in text(ops.page())  # a notice shows once


def test_a_resize_over_the_pool_budget_shows_why_and_changes_nothing(ops: Dashboard) -> None:
    ops.sign_in()
    budget = ops.settings.limits.region_pool_budget_vms

    refused = ops.post("/pools/ubuntu/size", {"size": str(budget + 1), "region": "local"})

    assert refused.status_code == 422
    message = notice(refused)
    assert f"may hold {budget} VMs in all" in message
    assert f"size: at most {budget} fits the pool budget." in message
    assert ops.pool().size == TEMPLATES["ubuntu"].pool.size
    assert "Warm pools" in text(refused)  # the whole page, with the message on top


@pytest.mark.parametrize(
    ("path", "form", "status", "says"),
    [
        ("/pools/ubuntu/size", {"size": "two", "region": "local"}, 400, "whole number"),
        ("/pools/ubuntu/size", {"size": "-1", "region": "local"}, 400, "whole number"),
        ("/pools/ubuntu/size", {"size": "99999", "region": "local"}, 400, "size:"),
        (
            "/pools/ubuntu/size",
            {"size": "1", "region": "mars"},
            422,
            "No cluster serves region 'mars'",
        ),
        ("/pools/nosuch/size", {"size": "1", "region": "local"}, 404, "No template named 'nosuch'"),
        ("/pools/ubuntu/paused", {"paused": "maybe", "region": "local"}, 400, "true or false"),
        ("/pools", {"paused": "1"}, 400, "true or false"),
        ("/failed/f-0123456789abcdef0123/requeue", {}, 404, "No such failed task"),
    ],
)
def test_bad_input_is_a_readable_4xx_on_the_page(
    ops: Dashboard, path: str, form: dict[str, str], status: int, says: str
) -> None:
    ops.sign_in()

    response = ops.post(path, form)

    assert response.status_code == status, text(response)
    assert response.mimetype == "text/html"
    assert says in notice(response)
    assert ops.pool().size == TEMPLATES["ubuntu"].pool.size


def test_pausing_one_pool_and_every_pool(ops: Dashboard) -> None:
    ops.sign_in()
    assert ops.runtime.pools is not None

    assert (
        ops.post("/pools/ubuntu/paused", {"paused": "true", "region": "local"}).status_code == 303
    )
    assert ops.pool().paused
    assert notice(ops.page()) == "The ubuntu pool of local is paused."
    assert ops.post("/pools", {"paused": "true"}).status_code == 303
    assert ops.runtime.pools.globally_paused()
    page = ops.page()
    assert notice(page) == "Every pool is paused."
    assert "Resume all" in text(page)

    ops.post("/pools/ubuntu/paused", {"paused": "false", "region": "local"})
    ops.post("/pools", {"paused": "false"})
    assert not ops.pool().paused
    assert not ops.runtime.pools.globally_paused()


def test_requeue_queues_once_and_records_who(ops: Dashboard) -> None:
    letter = ops.runtime.dead_letters.record(
        task=TEARDOWN,
        payload={"session_id": "s-" + "1" * 24},
        task_id="celery-1",
        error=RuntimeError("the cluster refused: 503 Service Unavailable"),
        traceback="Traceback ...",
    )
    ops.sign_in(operator="ann")
    before = text(ops.page())
    assert "the cluster refused: 503 Service Unavailable" in before
    assert "Requeue" in before

    first = ops.post(f"/failed/{letter.id}/requeue", {})
    again = ops.post(f"/failed/{letter.id}/requeue", {})

    assert (first.status_code, again.status_code) == (303, 303)
    assert [task.name for task in ops.celery.sent] == [TEARDOWN]
    stored = ops.runtime.dead_letters.get(letter.id)
    assert stored is not None
    assert stored.status == Status.REQUEUED
    (requeue,) = stored.requeues
    assert requeue["by"].startswith("ann (admin ")
    page = ops.page()
    assert notice(page) == f"{TEARDOWN} ({letter.id}) is already requeued: not queued again."
    row = re.search(rf'data-failure="{letter.id}".*?</tr>', page.get_data(as_text=True), re.S)
    assert row is not None
    assert "requeued" in row.group(0)
    assert "by ann (admin " in row.group(0)
    assert 'class="requeue"' not in row.group(0)  # nothing left to requeue


# -- what the page shows ---------------------------------------------------------------------


def test_the_page_counts_live_sessions_and_charts_time_to_ready(ops: Dashboard) -> None:
    clocks = clocks_for(TEMPLATES["ubuntu"])
    now = ops.clock()
    for index, wait in enumerate((20.0, 30.0, 40.0)):
        session, _ = start_session(
            user=f"learner{index}", template="ubuntu", region="local", clocks=clocks, now=now
        )
        ops.runtime.sessions.add(session.mark_ready(vms=[VM], at=now + wait))
    booting, _ = start_session(
        user="late", template="ubuntu", region="local", clocks=clocks, now=now
    )
    ops.runtime.sessions.add(booting)
    ops.sign_in()

    page = ops.page()
    body = page.get_data(as_text=True)

    live = re.search(r'data-region="local".*?</tr>', body, re.S)
    assert live is not None
    assert re.findall(r">(\d+)<", live.group(0)) == ["0", "4", "4", "1"]  # kubernetes, ubuntu
    assert "ubuntu · cold" in text(page)
    assert "30 s / 40 s" in text(page)  # median and 95th percentile
    assert '<svg class="chart"' in body
    assert "last 3 sessions that became ready" in text(page)


def test_the_dashboards_files_are_served_and_nothing_else(ops: Dashboard) -> None:
    css = ops.client.get(f"{PAGE}/static/ops.css")
    script = ops.client.get(f"{PAGE}/static/ops.js")
    missing = ops.client.get(f"{PAGE}/static/..%2Fops_ui.py")

    assert (css.status_code, css.mimetype) == (200, "text/css")
    assert (script.status_code, script.mimetype) == (200, "text/javascript")
    assert "setInterval" in script.get_data(as_text=True)
    assert missing.status_code == 404
    for response in (css, script):
        response.close()
