"""Who may call what: every route of the API, with every kind of credential.

The routes come from the app's own url_map, so a route added without an entry in ``ROUTES``
fails here. Each call runs against a fresh world (real Redis: sessions, warm pools, failed
tasks) holding two sessions, the caller's own and another learner's, and one failed task.

The documented matrix (README, API section):

| credential                       | public | platform | session route  | admin | metrics |
| -------------------------------- | ------ | -------- | -------------- | ----- | ------- |
| none                             | ok     | 401      | 401            | 401   | 401     |
| unknown token                    | ok     | 401      | 404            | 401   | 401     |
| frontend token                   | ok     | ok       | ok             | 403   | 403     |
| admin token                      | ok     | ok       | ok             | ok    | ok      |
| the session's own token          | ok     | 401      | ok             | 401   | 401     |
| another session's token          | ok     | 401      | 404            | 401   | 401     |
| a scrape token                   | ok     | 401      | 404            | 401   | ok      |

The operators' dashboard (``/ui/ops``) is signed in to with a cookie, never a bearer token:
whatever the Authorization header says, its page shows the sign-in form, a sign-in with the
admin token in the form succeeds, and its actions answer 401 (sign in first).

On a session route an unknown token and another session's token are one case: labvirt keeps
only hashes of session tokens, so it can tell neither from the other, and both mean "no such
session" (404, the same answer as for an absent one).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

import pytest
import redis
from flask import Flask
from werkzeug.test import TestResponse

from services.api.app import create_app
from shared.adapters.pool_store import RedisPoolStore
from shared.adapters.session_store import RedisSessionStore
from shared.domain.lifecycle import clocks_for, start_session
from shared.jobs import TEARDOWN
from shared.runtime import Runtime
from tests.conftest import flush_database
from tests.doubles import RecordingCelery
from tests.unit.test_api import ADMIN, FRONTEND, TEMPLATES, FakeClock, error_of, make_settings


class Access(Enum):
    PUBLIC = "public"
    PLATFORM = "platform"  # frontend or admin token
    SESSION = "session"  # a platform token, or the token of the session in the path
    ADMIN = "admin"
    DASHBOARD = "dashboard"  # the cookie signs in; the bearer token changes nothing
    METRICS = "metrics"  # an admin token or a scrape token


class Credential(Enum):
    NONE = "none"
    UNKNOWN = "unknown token"
    FRONTEND = "frontend token"
    ADMIN = "admin token"
    OWN_SESSION = "the session's own token"
    OTHER_SESSION = "another session's token"
    SCRAPE = "a scrape token"


SCRAPE = "scrape-4b1f0a9d2c8e7f3a5b6c1d0e9f8a7b6c"  # LABVIRT_METRICS_TOKENS
OK = 0  # stands for the route's own success status
MATRIX: dict[Access, dict[Credential, int]] = {
    Access.PUBLIC: dict.fromkeys(Credential, OK),
    Access.DASHBOARD: dict.fromkeys(Credential, OK),
    Access.PLATFORM: {
        Credential.NONE: 401,
        Credential.UNKNOWN: 401,
        Credential.FRONTEND: OK,
        Credential.ADMIN: OK,
        Credential.OWN_SESSION: 401,
        Credential.OTHER_SESSION: 401,
        Credential.SCRAPE: 401,
    },
    Access.SESSION: {
        Credential.NONE: 401,
        Credential.UNKNOWN: 404,
        Credential.FRONTEND: OK,
        Credential.ADMIN: OK,
        Credential.OWN_SESSION: OK,
        Credential.OTHER_SESSION: 404,
        Credential.SCRAPE: 404,
    },
    Access.ADMIN: {
        Credential.NONE: 401,
        Credential.UNKNOWN: 401,
        Credential.FRONTEND: 403,
        Credential.ADMIN: OK,
        Credential.OWN_SESSION: 401,
        Credential.OTHER_SESSION: 401,
        Credential.SCRAPE: 401,
    },
    Access.METRICS: {
        Credential.NONE: 401,
        Credential.UNKNOWN: 401,
        Credential.FRONTEND: 403,
        Credential.ADMIN: OK,
        Credential.OWN_SESSION: 401,
        Credential.OTHER_SESSION: 401,
        Credential.SCRAPE: OK,
    },
}
CODES = {401: "unauthorized", 403: "forbidden", 404: "session_not_found"}


@dataclass(frozen=True)
class Route:
    access: Access
    success: int
    body: dict[str, Any] | None = None
    form: dict[str, str] | None = None  # sent as a form instead of ``body``


# (rule, method) -> who may call it, its success status, and a body it accepts. HEAD is
# checked as GET is; OPTIONS answers every route's Allow to anyone.
ROUTES: dict[tuple[str, str], Route] = {
    ("/healthz", "GET"): Route(Access.PUBLIC, 200),
    ("/readyz", "GET"): Route(Access.PUBLIC, 200),
    ("/openapi.json", "GET"): Route(Access.PUBLIC, 200),
    ("/docs", "GET"): Route(Access.PUBLIC, 200),
    ("/docs/vendor/<asset>", "GET"): Route(Access.PUBLIC, 200),
    ("/v1/templates", "GET"): Route(Access.PLATFORM, 200),
    ("/v1/sessions", "POST"): Route(
        Access.PLATFORM, 201, {"template": "ubuntu", "user": "newcomer"}
    ),
    ("/v1/sessions/<session_id>", "GET"): Route(Access.SESSION, 200),
    ("/v1/sessions/<session_id>", "DELETE"): Route(Access.SESSION, 202),
    ("/v1/sessions/<session_id>/close", "POST"): Route(Access.SESSION, 202),
    ("/v1/sessions/<session_id>/heartbeat", "POST"): Route(Access.SESSION, 200),
    ("/v1/sessions/<session_id>/extend", "POST"): Route(Access.SESSION, 200),
    ("/v1/sessions/<session_id>/tickets", "POST"): Route(Access.SESSION, 201),
    ("/v1/admin/pools", "GET"): Route(Access.ADMIN, 200),
    ("/v1/admin/pools", "PUT"): Route(Access.ADMIN, 200, {"paused": True}),
    ("/v1/admin/pools/<template>", "PUT"): Route(Access.ADMIN, 200, {"size": 1}),
    ("/v1/admin/regions", "GET"): Route(Access.ADMIN, 200),
    ("/v1/admin/regions/<region>", "PUT"): Route(Access.ADMIN, 200, {"drained": True}),
    ("/v1/admin/failed", "GET"): Route(Access.ADMIN, 200),
    ("/v1/admin/failed/<failure:failure_id>", "GET"): Route(Access.ADMIN, 200),
    ("/v1/admin/failed/<failure:failure_id>", "DELETE"): Route(Access.ADMIN, 200),
    ("/v1/admin/failed/<failure:failure_id>/requeue", "POST"): Route(Access.ADMIN, 200),
    ("/v1/admin/failed/requeue", "POST"): Route(Access.ADMIN, 200, {}),
    ("/v1/admin/sessions", "GET"): Route(Access.ADMIN, 200),
    ("/metrics", "GET"): Route(Access.METRICS, 200),
    ("/ui/ops", "GET"): Route(Access.DASHBOARD, 200),
    ("/ui/ops/sign-in", "POST"): Route(Access.DASHBOARD, 303, form={"token": ADMIN}),
    ("/ui/ops/sign-out", "POST"): Route(Access.DASHBOARD, 303),
    ("/ui/ops/pools", "POST"): Route(Access.DASHBOARD, 401, form={"paused": "true"}),
    ("/ui/ops/pools/<template>/size", "POST"): Route(Access.DASHBOARD, 401, form={"size": "1"}),
    ("/ui/ops/pools/<template>/paused", "POST"): Route(
        Access.DASHBOARD, 401, form={"paused": "true"}
    ),
    ("/ui/ops/failed/<failure:failure_id>/requeue", "POST"): Route(Access.DASHBOARD, 401),
    ("/ui/ops/static/<asset>", "GET"): Route(Access.DASHBOARD, 200),
}


class World:
    """One API over the suite's Redis; ``reset`` empties it and seeds two sessions, the
    caller's own and a stranger's, and one failed task."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.client = redis.Redis.from_url(redis_url)
        self.runtime = Runtime(
            settings=replace(make_settings(), metrics_tokens=frozenset({SCRAPE})),
            redis=self.client,
            sessions=RedisSessionStore(self.client),
            templates=TEMPLATES,
            celery=RecordingCelery(),  # type: ignore[arg-type]
            clock=FakeClock(),
            pools=RedisPoolStore(self.client),
        )
        self.app = create_app(self.runtime)
        self.tokens: dict[Credential, str | None] = {}
        self.path_values: dict[str, str] = {}

    def reset(self) -> None:
        flush_database(self.redis_url)
        sessions = {}
        for user in ("owner", "stranger"):
            session, token = start_session(
                user=user,
                template="ubuntu",
                region="local",
                clocks=clocks_for(TEMPLATES["ubuntu"]),
                now=self.runtime.clock(),
            )
            self.runtime.sessions.add(session)
            sessions[user] = (session.id, token)
        letter = self.runtime.dead_letters.record(
            task=TEARDOWN,
            payload={"session_id": sessions["owner"][0]},
            task_id="celery-task-1",
            error=RuntimeError("the cluster is gone"),
            traceback="Traceback (most recent call last):\n  ...",
        )
        self.tokens = {
            Credential.NONE: None,
            Credential.UNKNOWN: "unknown-" + "u" * 24,
            Credential.FRONTEND: FRONTEND,
            Credential.ADMIN: ADMIN,
            Credential.OWN_SESSION: sessions["owner"][1],
            Credential.OTHER_SESSION: sessions["stranger"][1],
            Credential.SCRAPE: SCRAPE,
        }
        self.path_values = {
            "session_id": sessions["owner"][0],
            "failure_id": letter.id,
            "template": "ubuntu",
            "region": "local",
            "asset": "swagger-ui.css",
        }

    def call(
        self,
        method: str,
        rule: str,
        credential: Credential,
        body: Any,
        *,
        form: dict[str, str] | None = None,
    ) -> TestResponse:
        path = rule
        for name, value in self.path_values.items():
            if rule.startswith("/ui/ops/static/") and name == "asset":
                value = "ops.css"  # noqa: PLW2901 - the dashboard's assets are its own
            path = re.sub(rf"<(?:\w+:)?{name}>", value, path)
        token = self.tokens[credential]
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        if form is not None:
            return self.app.test_client().open(path, method=method, headers=headers, data=form)
        return self.app.test_client().open(path, method=method, headers=headers, json=body)


@pytest.fixture
def world(redis_url: str) -> Iterator[World]:
    built = World(redis_url)
    built.reset()
    yield built
    built.client.close()
    flush_database(redis_url)


def every_rule_and_method(app: Flask) -> Iterator[tuple[str, str]]:
    for rule in app.url_map.iter_rules():
        for method in sorted(rule.methods or ()):
            yield rule.rule, method


def entry_of(rule: str, method: str) -> Route | None:
    """The route's entry; HEAD is answered as GET (Flask runs the GET view)."""
    return ROUTES.get((rule, "GET" if method == "HEAD" else method))


def expected_status(route: Route, credential: Credential) -> int:
    status = MATRIX[route.access][credential]
    return route.success if status == OK else status


def test_every_route_has_an_entry_and_every_entry_a_route(world: World) -> None:
    served = set(every_rule_and_method(world.app))
    documented = {key for key in served if key[1] not in ("HEAD", "OPTIONS")}

    assert documented - set(ROUTES) == set(), "routes without an entry in ROUTES"
    assert set(ROUTES) - documented == set(), "entries in ROUTES for routes that do not exist"


@pytest.mark.parametrize("credential", list(Credential), ids=lambda c: c.value)
def test_every_route_answers_each_credential_as_documented(
    world: World, credential: Credential
) -> None:
    wrong: list[str] = []
    for rule, method in list(every_rule_and_method(world.app)):
        world.reset()  # each call on a fresh world: a close must not change the next
        if method == "OPTIONS":  # Flask's own answer: the Allow header, to anyone
            answer = world.call(method, rule, credential, None)
            assert (answer.status_code, answer.get_data()) == (200, b""), rule
            assert "Allow" in answer.headers, rule
            continue
        route = entry_of(rule, method)
        if route is None:
            wrong.append(f"{method} {rule}: no entry in ROUTES")
            continue
        answer = world.call(method, rule, credential, route.body, form=route.form)
        expected = expected_status(route, credential)
        if answer.status_code != expected:
            wrong.append(
                f"{method} {rule}: {answer.status_code}, expected {expected}: "
                f"{answer.get_data(as_text=True)[:200]}"
            )
        elif expected in CODES and method != "HEAD" and route.access is not Access.DASHBOARD:
            # The dashboard answers people with its pages, not problem documents.
            assert error_of(answer)["code"] == CODES[expected], (method, rule)
            if expected == 401:
                assert answer.headers["WWW-Authenticate"] == "Bearer", (method, rule)
    assert wrong == [], "\n".join(wrong)
