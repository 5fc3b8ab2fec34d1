"""The lifecycle endpoints over a hand-built Runtime: reconnect and replace, extension, and the
server-sent event stream (fakeredis, a recording Celery port and a fake clock)."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import fakeredis
import pytest

from shared.domain.sessions import SessionState
from shared.jobs import PROVISION, TEARDOWN
from tests.unit.test_api import FRONTEND, NOW, TEMPLATES, Api, context_of, error_of, iso

UBUNTU = TEMPLATES["ubuntu"]


@pytest.fixture
def api() -> Api:
    return Api()


def with_settings(api: Api, **changes: Any) -> Api:
    """The API as a process started with these settings serves it: the services the runtime
    builds from them (``SessionLife``'s limit of sessions per user) are built again."""
    api.runtime.settings = dataclasses.replace(api.runtime.settings, **changes)
    api.runtime.__post_init__()
    return api


# -- one session per user ----------------------------------------------------------------------


def test_a_second_create_for_the_same_template_reconnects_without_a_token(api: Api) -> None:
    first = api.create(template="ubuntu")
    api.clock.advance(30)

    again = api.create(template="ubuntu")

    assert again.status_code == 200
    body = again.json
    assert body["id"] == first.json["id"]
    assert body["reconnected"] is True
    assert "token" not in body
    assert again.headers["Location"] == f"/v1/sessions/{body['id']}"
    assert [t.payload for t in api.sent(PROVISION)] == [{"session_id": body["id"]}]  # once
    # The first token is still the one that works.
    own = api.call("GET", f"/v1/sessions/{body['id']}", token=first.json["token"])
    assert own.status_code == 200


def test_another_template_is_409_naming_the_session_in_the_way(api: Api) -> None:
    first = api.create(template="ubuntu").json

    response = api.create(template="kubernetes")

    assert response.status_code == 409
    error = error_of(response)
    assert error["code"] == "session_limit"
    assert first["id"] in error["detail"]
    assert '"replace": true' in error["detail"]
    assert context_of(error) == {
        "max_sessions_per_user": 1,
        "sessions": [
            {"id": first["id"], "template": "ubuntu", "region": "local", "state": "provisioning"}
        ],
    }
    assert len(api.sent(PROVISION)) == 1


def test_replace_closes_the_old_session_and_creates_a_new_one(api: Api) -> None:
    first = api.create(template="ubuntu").json

    response = api.create(template="kubernetes", replace=True)

    assert response.status_code == 201
    second = response.json
    assert second["template"] == "kubernetes"
    assert second["token"]
    old = api.stored(first["id"])
    assert old.state is SessionState.TERMINATING
    assert old.reason == "replaced"
    assert [t.payload for t in api.sent(TEARDOWN)] == [{"session_id": first["id"]}]
    assert [t.payload for t in api.sent(PROVISION)] == [
        {"session_id": first["id"]},
        {"session_id": second["id"]},
    ]


def test_replace_with_the_same_template_starts_afresh(api: Api) -> None:
    first = api.create(template="ubuntu").json

    second = api.create(template="ubuntu", replace=True)

    assert second.status_code == 201
    assert second.json["id"] != first["id"]


def test_a_closed_session_does_not_count(api: Api) -> None:
    first = api.create(template="ubuntu").json
    api.call("DELETE", f"/v1/sessions/{first['id']}", token=FRONTEND)

    assert api.create(template="kubernetes").status_code == 201


def test_the_limit_is_configurable(api: Api) -> None:
    with_settings(api, max_sessions_per_user=2)

    assert api.create(template="ubuntu").status_code == 201
    assert api.create(template="kubernetes").status_code == 201
    assert api.create(template="ubuntu").status_code == 200
    with_settings(api, max_sessions_per_user=1)  # lowered while two are open: nothing new
    assert api.create(template="ubuntu", user="alice").status_code == 200
    assert api.create(template="ubuntu", region="local", replace=True).status_code == 201


def test_other_users_are_not_affected(api: Api) -> None:
    assert api.create(template="ubuntu", user="alice").status_code == 201
    assert api.create(template="kubernetes", user="bob").status_code == 201


def test_concurrent_creates_for_one_user_make_one_session() -> None:
    """Each request reads the user's sessions before writing: without the lock, a race."""
    server = fakeredis.FakeServer()
    apis = [Api(redis_client=fakeredis.FakeRedis(server=server)) for _ in range(8)]
    barrier = threading.Barrier(len(apis), timeout=10)
    answers: list[tuple[int, str]] = []
    lock = threading.Lock()

    def create(one: Api) -> None:
        barrier.wait()
        response = one.client.post(
            "/v1/sessions",
            json={"template": "ubuntu", "user": "alice"},
            headers={"Authorization": f"Bearer {FRONTEND}"},
        )
        with lock:
            answers.append((response.status_code, response.json["id"]))

    threads = [threading.Thread(target=create, args=(one,)) for one in apis]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    codes = sorted(code for code, _ in answers)
    assert codes == [200] * 7 + [201]
    assert len({session_id for _, session_id in answers}) == 1
    assert sum(len(one.sent(PROVISION)) for one in apis) == 1


def test_a_user_held_too_long_gets_a_503_to_retry(api: Api) -> None:
    api.redis.set("labvirt:user-lock:alice", "someone else", px=60_000)
    original = api.sessions.user_lock

    def impatient(user: str, **_: Any) -> Any:
        return original(user, wait_seconds=0.05)

    api.sessions.user_lock = impatient  # type: ignore[method-assign]

    response = api.create(template="ubuntu")

    assert response.status_code == 503
    assert error_of(response)["code"] == "user_busy"
    assert response.headers["Retry-After"] == "1"


# -- extension -------------------------------------------------------------------------------


def test_extend_moves_the_end_by_one_step_and_says_how_far_it_can_go(api: Api) -> None:
    session_id, token = api.open_session()
    api.clock.advance(600)

    response = api.call("POST", f"/v1/sessions/{session_id}/extend", token=token)

    assert response.status_code == 200
    body = response.json
    assert body["expires_at"] == iso(NOW + UBUNTU.max_lifetime_seconds + UBUNTU.extend_step_seconds)
    assert body["hard_expires_at"] == iso(NOW + UBUNTU.hard_deadline_seconds)
    assert body["idle_expires_at"] == iso(NOW + 600 + UBUNTU.idle_timeout_seconds)


def test_extend_past_the_hard_deadline_is_409(api: Api) -> None:
    session_id, _ = api.open_session()
    steps = -(
        -(UBUNTU.hard_deadline_seconds - UBUNTU.max_lifetime_seconds) // UBUNTU.extend_step_seconds
    )
    for _ in range(steps):
        ok = api.call("POST", f"/v1/sessions/{session_id}/extend", token=FRONTEND)
        assert ok.status_code == 200

    refused = api.call("POST", f"/v1/sessions/{session_id}/extend", token=FRONTEND)

    assert refused.status_code == 409
    error = error_of(refused)
    assert error["code"] == "hard_deadline_reached"
    assert error["expires_at"] == error["hard_expires_at"]
    assert error["hard_expires_at"] == iso(NOW + UBUNTU.hard_deadline_seconds)


def test_extend_with_the_token_in_a_beacon_body(api: Api) -> None:
    session_id, token = api.open_session()

    response = api.call("POST", f"/v1/sessions/{session_id}/extend", data={"token": token})

    assert response.status_code == 200


def test_extend_of_a_closed_session_is_409(api: Api) -> None:
    session_id, _ = api.open_session()
    api.call("DELETE", f"/v1/sessions/{session_id}", token=FRONTEND)

    response = api.call("POST", f"/v1/sessions/{session_id}/extend", token=FRONTEND)

    assert response.status_code == 409
    assert error_of(response)["code"] == "session_closed"


def test_extend_of_another_sessions_token_is_404(api: Api) -> None:
    session_id, _ = api.open_session(user="alice")
    _, other_token = api.open_session(user="bob")

    response = api.call("POST", f"/v1/sessions/{session_id}/extend", token=other_token)

    assert response.status_code == 404
