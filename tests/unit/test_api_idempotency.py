"""``Idempotency-Key`` on ``POST /v1/sessions`` through the Flask test client, on the suite's
real Redis: a replay answers what the first request answered and creates nothing; another body
is a 422; a failure does not pin the key; concurrent duplicates create one session."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import redis
from flask import Flask
from werkzeug.test import TestResponse

from services.api.app import create_app
from services.api.idempotency import HEADER, HEADER_POINTER, WAIT_EXTENSION, InFlightWait
from services.api.schemas import CreateSessionRequest
from shared.adapters.idempotency import (
    PREFIX,
    Claimed,
    IdempotencyScope,
    IdempotencyStore,
    StoredResponse,
    body_fingerprint,
)
from shared.adapters.session_store import RedisSessionStore
from shared.adapters.template_files import load_templates
from shared.config import Cluster, Mode, Settings
from shared.jobs import PROVISION
from shared.runtime import Runtime
from tests.doubles import RecordingCelery

FRONTEND = "f" * 20
OTHER_FRONTEND = "g" * 20
ADMIN = "a" * 20
NOW = 1_700_000_000.0
TTL = 7200
KEY = "create-alice-ubuntu-1"
BODY = {"template": "ubuntu", "user": "alice"}


class FakeTime:
    """A monotonic clock that moves only when the code under test sleeps."""

    def __init__(self, on_sleep: Callable[[], None] | None = None) -> None:
        self.now = 0.0
        self.pauses: list[float] = []
        self.on_sleep = on_sleep

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds
        if self.on_sleep is not None:
            self.on_sleep()


class Api:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self.celery = RecordingCelery()
        self.runtime = Runtime(
            settings=Settings(
                mode=Mode.DEV,
                frontend_tokens=frozenset({FRONTEND, OTHER_FRONTEND}),
                admin_tokens=frozenset({ADMIN}),
                clusters=(Cluster("local", None, None, "default"),),
                idempotency_ttl_seconds=TTL,
            ),
            redis=client,
            sessions=RedisSessionStore(client),
            templates=load_templates(None),
            celery=self.celery,  # type: ignore[arg-type]
            clock=lambda: NOW,
        )
        self.app: Flask = create_app(self.runtime)

    def create(
        self,
        body: dict[str, Any] = BODY,
        *,
        key: str | None = KEY,
        token: str = FRONTEND,
    ) -> TestResponse:
        headers: list[tuple[str, str]] = [("Authorization", f"Bearer {token}")]
        if key is not None:
            headers.append((HEADER, key))
        response = self.app.test_client().post("/v1/sessions", json=body, headers=headers)
        assert response.status_code != 500, response.get_data(as_text=True)
        return response

    def wait_with(self, fake: FakeTime) -> None:
        self.app.extensions[WAIT_EXTENSION] = InFlightWait(
            monotonic=fake.monotonic, sleep=fake.sleep
        )

    def session_count(self) -> int:
        return len(list(self.redis.scan_iter("labvirt:session:*")))

    def provisions(self) -> int:
        return len(self.celery.named(PROVISION))

    def idempotency_records(self) -> dict[bytes, bytes]:
        found = {name: self.redis.get(name) for name in self.redis.scan_iter(f"{PREFIX}:*")}
        return {name: value for name, value in found.items() if value is not None}


@pytest.fixture
def api(connect: Callable[[], redis.Redis]) -> Api:
    return Api(connect())


def answer(response: TestResponse) -> tuple[int, str, str | None]:
    return response.status_code, response.get_data(as_text=True), response.headers.get("Location")


def hold_claim(api: Api, body: dict[str, Any] = BODY) -> tuple[IdempotencyScope, Claimed]:
    """What a first request holds while it is still creating the session."""
    where = IdempotencyScope.derive(credential=FRONTEND, idempotency_key=KEY)
    fingerprint = body_fingerprint(CreateSessionRequest().load(body))
    claim = IdempotencyStore(api.redis, ttl_seconds=TTL).claim(where, fingerprint)
    assert isinstance(claim, Claimed)
    return where, claim


# -- replays ----------------------------------------------------------------------------------


def test_the_same_key_and_body_replay_the_first_answer_and_create_nothing(api: Api) -> None:
    first = api.create()
    again = api.create()

    assert first.status_code == 201, first.json
    assert first.json["token"]
    assert answer(again) == answer(first)
    assert again.json["token"] == first.json["token"]
    assert again.headers["Location"] == f"/v1/sessions/{first.json['id']}"
    assert again.mimetype == "application/json"
    assert api.session_count() == 1
    assert api.provisions() == 1


def test_without_a_key_a_second_create_reconnects_as_before(api: Api) -> None:
    first = api.create(key=None)
    second = api.create(key=None)

    assert first.status_code == 201
    assert second.status_code == 200
    assert second.json["reconnected"] is True
    assert "token" not in second.json
    assert api.idempotency_records() == {}


def test_another_body_with_the_same_key_is_refused(api: Api) -> None:
    first = api.create()

    reused = api.create({**BODY, "template": "kubernetes"})

    assert first.status_code == 201
    assert reused.status_code == 422
    assert reused.mimetype == "application/problem+json"
    assert reused.json["code"] == "idempotency_key_reused"
    assert HEADER in reused.json["detail"]
    assert api.session_count() == 1


def test_keys_are_scoped_per_frontend(api: Api) -> None:
    mine = api.create(token=FRONTEND)
    theirs = api.create({**BODY, "user": "bob"}, token=OTHER_FRONTEND)

    assert mine.status_code == 201
    assert theirs.status_code == 201
    assert theirs.json["id"] != mine.json["id"]
    assert api.session_count() == 2


def test_the_answer_is_kept_for_the_configured_lifetime(api: Api) -> None:
    api.create()

    [name] = api.idempotency_records()
    assert TTL - 5 < api.redis.ttl(name) <= TTL


def test_redis_holds_neither_the_session_token_nor_the_key(api: Api) -> None:
    token = api.create().json["token"]

    records = api.idempotency_records()
    assert records
    for name, value in records.items():
        for secret in (token, KEY, FRONTEND):
            assert secret.encode() not in name
            assert secret.encode() not in value


# -- failures ---------------------------------------------------------------------------------


def test_a_failed_first_request_does_not_pin_the_key(api: Api) -> None:
    api.celery.fail_with = ConnectionError("broker down")
    failed = api.create()
    api.celery.fail_with = None
    retried = api.create()
    replayed = api.create()

    assert failed.status_code == 503
    assert failed.json["code"] == "unavailable"
    assert retried.status_code == 201, retried.json
    assert answer(replayed) == answer(retried)
    assert api.provisions() == 1


def test_a_refused_first_request_does_not_pin_the_key(api: Api) -> None:
    unauthorised = api.create(token="not-a-known-token-at-all")
    unknown = api.create({**BODY, "template": "no-such-template"})

    assert unauthorised.status_code == 401
    assert unknown.status_code == 422
    assert unknown.json["code"] == "unknown_template"
    assert api.idempotency_records() == {}
    assert api.create({**BODY, "template": "kubernetes"}).status_code == 201


@pytest.mark.parametrize(
    "key",
    [
        pytest.param("", id="empty"),
        pytest.param("k" * 256, id="too-long"),
        pytest.param("café", id="not-ascii"),
        pytest.param("a\x7fb", id="control-character"),
    ],
)
def test_a_malformed_key_is_a_400_pointing_at_the_header(api: Api, key: str) -> None:
    response = api.create(key=key)

    assert response.status_code == 400, response.json
    assert response.mimetype == "application/problem+json"
    assert response.json["code"] == "invalid_request"
    [problem] = response.json["errors"]
    assert problem["pointer"] == HEADER_POINTER
    assert api.session_count() == 0
    assert api.idempotency_records() == {}


def test_the_longest_key_is_accepted(api: Api) -> None:
    longest = "~ " + "k" * 252 + "!"  # printable ASCII includes the space

    assert len(longest) == 255
    assert api.create(key=longest).status_code == 201


# -- duplicates in flight ---------------------------------------------------------------------


def test_a_duplicate_waits_a_bounded_time_then_is_told_to_retry(api: Api) -> None:
    hold_claim(api)
    fake = FakeTime()
    api.wait_with(fake)

    response = api.create()

    assert response.status_code == 409
    assert response.json["code"] == "idempotency_key_in_flight"
    assert response.headers["Retry-After"] == "1"
    assert fake.now == pytest.approx(InFlightWait().seconds)
    assert fake.pauses[:4] == pytest.approx([0.02, 0.04, 0.08, 0.16])
    assert max(fake.pauses) == pytest.approx(InFlightWait().longest_pause)
    assert api.session_count() == 0


def test_a_duplicate_that_waits_gets_the_first_request_s_answer(api: Api) -> None:
    where, claim = hold_claim(api)
    first = StoredResponse(201, '{"id": "s-1", "token": "t"}', "application/json", "/v1/x")

    def first_request_answers() -> None:
        IdempotencyStore(api.redis, ttl_seconds=TTL).complete(where, claim, first)

    api.wait_with(FakeTime(on_sleep=first_request_answers))

    response = api.create()

    assert answer(response) == (201, first.body, first.location)
    assert api.session_count() == 0


def test_a_duplicate_takes_over_when_the_first_request_fails(api: Api) -> None:
    where, claim = hold_claim(api)

    def first_request_fails() -> None:
        IdempotencyStore(api.redis, ttl_seconds=TTL).release(where, claim)

    api.wait_with(FakeTime(on_sleep=first_request_fails))

    response = api.create()

    assert response.status_code == 201
    assert api.session_count() == 1


def test_another_body_while_the_first_is_in_flight_is_refused_at_once(api: Api) -> None:
    hold_claim(api)
    fake = FakeTime()
    api.wait_with(fake)

    response = api.create({**BODY, "replace": True})

    assert response.status_code == 422
    assert response.json["code"] == "idempotency_key_reused"
    assert fake.pauses == []


def test_concurrent_duplicates_create_one_session_and_answer_alike(api: Api) -> None:
    racers = 8
    start = threading.Barrier(racers)
    answers: list[tuple[int, str, str | None]] = []
    lock = threading.Lock()

    def race() -> None:
        start.wait()
        result = answer(api.create())
        with lock:
            answers.append(result)

    threads = [threading.Thread(target=race) for _ in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert len(answers) == racers
    assert {status for status, _, _ in answers} == {201}
    assert len(set(answers)) == 1
    assert api.session_count() == 1
    assert api.provisions() == 1
