"""No input makes the API answer 500: tokens outside their alphabet, JSON nested to the
parser's limit, ids that almost match, malformed query strings, a Redis that does not answer.
Bad input is refused with a 4xx problem naming what was wrong; all through the Flask test
client of ``create_app``."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.test import TestResponse

from services.api.app import create_app
from services.api.json_bodies import MAX_JSON_DEPTH, TooDeep, check_depth, load_bounded
from shared.adapters.pool_store import RedisPoolStore
from shared.credentials import identify, matches_any, parse_bearer
from shared.domain.sessions import SessionState
from shared.jobs import TEARDOWN
from tests.unit.test_api import (
    ADMIN,
    FRONTEND,
    Api,
    disconnected_redis,
    error_of,
    pointers_of,
)

BEACON_ROUTES = ["/v1/sessions/{id}/heartbeat", "/v1/sessions/{id}/close"]


@pytest.fixture
def api() -> Api:
    return Api()


def beacon(api: Api, path: str, session_id: str, **kw: Any) -> TestResponse:
    """A call carrying its token in the body only, as ``navigator.sendBeacon`` sends it."""
    return api.call("POST", path.format(id=session_id), **kw)


# -- tokens in a body: the session token alphabet ----------------------------------------------


@pytest.mark.parametrize("path", BEACON_ROUTES)
@pytest.mark.parametrize(
    "token",
    ["\ud800", "tok\udcffen" * 5, "ключ" * 11, "a b", "abc\n", "a" * 257, "", "tok.en"],
    ids=["lone-surrogate", "escaped-bytes", "cyrillic", "space", "newline", "long", "empty", "dot"],
)
@pytest.mark.parametrize("how", ["json", "text/plain"])
def test_a_body_token_outside_the_alphabet_is_400_naming_the_field(
    api: Api, path: str, token: str, how: str
) -> None:
    session_id, _ = api.open_session()
    api.celery.sent.clear()
    text = json.dumps({"token": token})  # escapes a lone surrogate as \ud800, as a browser does
    content_type = "application/json" if how == "json" else "text/plain"

    response = beacon(api, path, session_id, data=text, content_type=content_type)

    assert response.status_code == 400
    problem = error_of(response)
    assert problem["code"] == "invalid_request"
    assert pointers_of(problem) == {"/token"}
    assert api.celery.sent == []
    assert api.stored(session_id).state is SessionState.PROVISIONING


@pytest.mark.parametrize("path", BEACON_ROUTES)
def test_a_form_token_outside_the_alphabet_is_400(api: Api, path: str) -> None:
    session_id, _ = api.open_session()

    response = beacon(api, path, session_id, data={"token": "tokén-" + "x" * 30})

    assert response.status_code == 400
    assert pointers_of(error_of(response)) == {"/token"}


@pytest.mark.parametrize("path", BEACON_ROUTES)
def test_a_body_token_of_the_alphabet_is_judged_as_a_token(api: Api, path: str) -> None:
    session_id, token = api.open_session()
    _, stranger = api.open_session(user="bob")

    refused = beacon(api, path, session_id, json={"token": stranger})
    accepted = beacon(api, path, session_id, json={"token": token})

    assert (refused.status_code, error_of(refused)["code"]) == (404, "session_not_found")
    assert accepted.status_code in {200, 202}


# -- bearer tokens outside printable ASCII -----------------------------------------------------


@pytest.mark.parametrize(
    "token",
    ["tokén-" + "x" * 20, "\x7f" * 20, "ÿ" * 43, "\udcff" * 43],
    ids=["latin-1", "delete", "latin-1-only", "surrogate-escaped"],
)
@pytest.mark.parametrize(
    "route",
    [("GET", "/v1/templates"), ("GET", "/v1/sessions/{id}"), ("GET", "/v1/admin/pools")],
)
def test_a_bearer_token_outside_printable_ascii_is_401(
    api: Api, token: str, route: tuple[str, str]
) -> None:
    session_id, _ = api.open_session()
    method, path = route

    # Straight into the environ: a WSGI server hands over whatever bytes came, as str.
    response = api.call(
        method,
        path.format(id=session_id),
        environ_base={"HTTP_AUTHORIZATION": f"Bearer {token}"},
    )

    assert response.status_code == 401
    assert error_of(response)["code"] == "unauthorized"


@pytest.mark.parametrize("token", ["\ud800", "\udcff" * 30, "tok én", "", "x" * 1025])
def test_credentials_refuse_what_is_no_token_without_raising(token: str) -> None:
    assert parse_bearer(f"Bearer {token}") is None
    assert matches_any(token, [FRONTEND, ADMIN]) is False
    assert identify(token, frontend=[FRONTEND], admin=[ADMIN]).role is None


def test_printable_ascii_tokens_still_match() -> None:
    assert parse_bearer(f"Bearer  {ADMIN} ") == ADMIN
    assert identify(ADMIN, frontend=[FRONTEND], admin=[ADMIN]).role is not None


# -- deep JSON ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "token", "content_type"),
    [
        ("/v1/sessions", FRONTEND, "application/json"),
        ("/v1/sessions/{id}/close", None, "application/json"),
        ("/v1/sessions/{id}/close", None, "text/plain"),
        ("/v1/sessions/{id}/heartbeat", None, "text/plain"),
        ("/v1/admin/failed/requeue", ADMIN, "application/json"),
    ],
)
@pytest.mark.parametrize(
    "data",
    ["[" * 20_000, '{"a":' * 12_000, "[" * 20_000 + "]" * 20_000],
    ids=["open", "objects", "closed"],
)
def test_json_nested_past_the_parser_is_400_invalid_json(
    api: Api, path: str, token: str | None, content_type: str, data: str
) -> None:
    session_id, _ = api.open_session()

    response = api.call(
        "POST", path.format(id=session_id), token=token, data=data, content_type=content_type
    )

    assert response.status_code == 400
    problem = error_of(response)
    assert problem["code"] == "invalid_json"
    assert f"deeper than {MAX_JSON_DEPTH} levels" in problem["detail"]


def nested(depth: int) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for _ in range(depth - 1):
        body = {"a": body}
    return body


def test_a_body_one_level_deeper_than_the_bound_is_refused_before_validation(api: Api) -> None:
    at_bound = api.call("POST", "/v1/sessions", token=FRONTEND, json=nested(MAX_JSON_DEPTH))
    past = api.call("POST", "/v1/sessions", token=FRONTEND, json=nested(MAX_JSON_DEPTH + 1))

    assert (at_bound.status_code, error_of(at_bound)["code"]) == (400, "invalid_request")
    assert (past.status_code, error_of(past)["code"]) == (400, "invalid_json")


@pytest.mark.parametrize("template", ["[" * 63, '\\"' + "{" * 61, "]" * 63])
def test_brackets_inside_strings_are_text_not_depth(api: Api, template: str) -> None:
    response = api.create(template=template)

    assert (response.status_code, error_of(response)["code"]) == (422, "unknown_template")


@pytest.mark.parametrize(
    ("text", "deep"),
    [
        ("[" * 33 + "]" * 33, True),
        ("[" * 32 + "]" * 32, False),
        ('["' + "[" * 100 + '"]', False),
        ('["\\"' + "[" * 100 + '"]', False),
        ('["\\\\"' + ",[" * 40 + "]" * 40 + "]", True),  # an escaped backslash ends the escape
        ("{" * 40, True),
        ('"' + "[" * 100, False),  # an unterminated string: invalid, but not deep
    ],
)
def test_the_depth_is_measured_outside_strings(text: str, deep: bool) -> None:
    if deep:
        with pytest.raises(TooDeep):
            check_depth(text)
    else:
        check_depth(text)


def test_the_bounded_loader_reads_bytes_as_json_does() -> None:
    assert load_bounded('{"a": ["\\u00e9"]}'.encode("utf-16")) == {"a": ["é"]}
    with pytest.raises(ValueError, match="deeper than"):
        load_bounded(b"[" * 100)


# -- ids in paths, matched in full -------------------------------------------------------------


def test_a_session_id_with_anything_after_it_is_no_session(api: Api) -> None:
    session_id, token = api.open_session()

    for suffix in ("%0A", "%0D%0A", "%00", "x", "%20"):
        response = api.call("GET", f"/v1/sessions/{session_id}{suffix}", token=FRONTEND)
        assert (response.status_code, error_of(response)["code"]) == (404, "session_not_found")
    assert api.call("GET", f"/v1/sessions/{session_id}", token=token).status_code == 200


def test_a_failure_id_with_anything_after_it_is_no_failure(api: Api) -> None:
    letter = api.runtime.dead_letters.record(
        task=TEARDOWN,
        payload={"session_id": "s-" + "a" * 24},
        task_id="celery-task-1",
        error=RuntimeError("boom"),
        traceback="Traceback (most recent call last):",
    )

    for suffix in ("%0A", "%00", "0"):
        response = api.call("GET", f"/v1/admin/failed/{letter.id}{suffix}", token=ADMIN)
        # Not a record's id: no route takes it.
        assert (response.status_code, error_of(response)["code"]) == (404, "not_found")
    assert api.call("GET", f"/v1/admin/failed/{letter.id}", token=ADMIN).status_code == 200


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_the_requeue_action_is_no_record(api: Api, method: str) -> None:
    response = api.call(method, "/v1/admin/failed/requeue", token=ADMIN)

    assert (response.status_code, error_of(response)["code"]) == (405, "method_not_allowed")
    assert set(response.headers["Allow"].split(", ")) == {"POST", "OPTIONS"}


@pytest.mark.parametrize(
    ("path", "body", "code"),
    [
        ("/v1/admin/pools/ubuntu%0A", {"size": 1}, "unknown_template"),
        ("/v1/admin/pools/ubuntu%00", {"size": 1}, "unknown_template"),
        ("/v1/admin/regions/local%0A", {"drained": True}, "unknown_region"),
        ("/v1/admin/regions/LOCAL", {"drained": True}, "unknown_region"),
    ],
)
def test_template_and_region_names_are_matched_in_full(
    api: Api, path: str, body: dict[str, Any], code: str
) -> None:
    # With a pool store: the name is judged, not the deployment's lack of pools. Nothing
    # reaches the store's scripts (fakeredis has no Lua) before the name is.
    api.client = create_app(
        dataclasses.replace(api.runtime, pools=RedisPoolStore(api.redis))
    ).test_client()

    response = api.call("PUT", path, token=ADMIN, json=body)

    assert (response.status_code, error_of(response)["code"]) == (404, code)


# -- health ------------------------------------------------------------------------------------


def test_readyz_says_unavailable_and_logs_why_instead_of_answering_it() -> None:
    api = Api(redis_client=disconnected_redis())

    with structlog.testing.capture_logs() as logs:
        response = api.call("GET", "/readyz")

    assert response.status_code == 503
    [logged] = [entry for entry in logs if entry["event"] == "api.not_ready"]
    assert "connection error" in logged["error"]
    answer = response.get_data(as_text=True)
    assert "connection" not in answer.lower()
    assert "FakeRedis" not in answer
    assert "unavailable" in (response.json.get("status"), response.json.get("code"))


# -- query strings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("limit=abc", "limit"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=-1", "limit"),
        ("limit=%C2%B2", "limit"),  # "²": isdigit() says yes, int() says no
        ("limit=1e3", "limit"),
        ("limit=99999999999999999999", "limit"),
        ("before=abc", "before"),
        ("before=nan", "before"),
        ("before=inf", "before"),
        ("before=-infinity", "before"),
        ("status=bogus", "status"),
        ("task=", "task"),
        ("region=" + "r" * 64, "region"),
    ],
)
def test_a_malformed_failed_tasks_query_is_400_pointing_into_the_query(
    api: Api, query: str, name: str
) -> None:
    response = api.call("GET", f"/v1/admin/failed?{query}", token=ADMIN)

    assert response.status_code == 400
    problem = error_of(response)
    assert problem["code"] == "invalid_request"
    assert pointers_of(problem) == {f"#/query/{name}"}


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("state=bogus", "state"),
        ("region=mars", "region"),
        ("limit=ten", "limit"),
        ("limit=0", "limit"),
    ],
)
def test_a_malformed_sessions_query_is_400_pointing_into_the_query(
    api: Api, query: str, name: str
) -> None:
    response = api.call("GET", f"/v1/admin/sessions?{query}", token=ADMIN)

    assert response.status_code == 400
    assert pointers_of(error_of(response)) == {f"#/query/{name}"}


def test_an_unknown_query_parameter_is_400_naming_it(api: Api) -> None:
    response = api.call("GET", "/v1/admin/failed?limit=5&colour=red", token=ADMIN)

    assert response.status_code == 400
    assert pointers_of(error_of(response)) == {"#/query/colour"}


@pytest.mark.parametrize("replace", ["true", 1, 0, "yes", None])
def test_replace_takes_a_json_boolean_only(api: Api, replace: Any) -> None:
    response = api.create(template="ubuntu", replace=replace)

    assert response.status_code == 400
    assert pointers_of(error_of(response)) == {"/replace"}
    assert api.celery.sent == []


def test_well_formed_queries_are_answered(api: Api) -> None:
    failed = api.call(
        "GET", "/v1/admin/failed?limit=5&before=1700000000.5&status=failed", token=ADMIN
    )
    sessions = api.call("GET", "/v1/admin/sessions?state=ended&limit=500", token=ADMIN)

    assert (failed.status_code, failed.json["failed"]) == (200, [])
    assert (sessions.status_code, sessions.json["sessions"]) == (200, [])


# -- anything at all ---------------------------------------------------------------------------

ANY_TEXT = st.text(st.characters() | st.characters(categories=["Cs"]), max_size=20)
# The fields the API's schemas know, so that examples reach their validation too.
FIELDS = st.sampled_from(
    [
        *("template", "user", "region", "location", "country", "replace", "token", "lat", "lon"),
        *("size", "mode", "min", "max", "hit_rate", "paused", "drained", "task", "status"),
    ]
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | ANY_TEXT,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(FIELDS | ANY_TEXT, inner, max_size=4)
    ),
    max_leaves=12,
)
WRITES = [
    ("POST", "/v1/sessions"),
    ("POST", "/v1/sessions/{id}/close"),
    ("POST", "/v1/sessions/{id}/heartbeat"),
    ("POST", "/v1/sessions/{id}/extend"),
    ("POST", "/v1/sessions/{id}/tickets"),
    ("PUT", "/v1/admin/pools"),
    ("PUT", "/v1/admin/pools/ubuntu"),
    ("PUT", "/v1/admin/regions/local"),
    ("POST", "/v1/admin/failed/requeue"),
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    route=st.sampled_from(WRITES),
    body=JSON_VALUES,
    token=st.sampled_from([FRONTEND, ADMIN, "own", None]),
    content_type=st.sampled_from(["application/json", "text/plain"]),
    escaped=st.booleans(),
)
def test_no_body_makes_a_500(
    route: tuple[str, str], body: Any, token: str | None, content_type: str, escaped: bool
) -> None:
    api = Api()
    session_id, own_token = api.open_session()
    method, path = route
    # Lone surrogates escaped (\ud800), or as the bytes a careless encoder writes.
    data = (
        json.dumps(body).encode()
        if escaped
        else json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
    )

    response = api.call(
        method,
        path.format(id=session_id),
        token=own_token if token == "own" else token,
        data=data,
        content_type=content_type,
    )

    assert response.status_code < 500 or response.status_code == 503, response.json
