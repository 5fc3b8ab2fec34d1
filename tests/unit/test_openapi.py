"""The API's contract: ``/openapi.json`` is valid OpenAPI 3.1, it names every route the app
serves and no other, and real answers (successes and problems) match what it documents."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from jsonschema import Draft202012Validator, FormatChecker
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from werkzeug.test import TestResponse

from services.api.app import create_app
from services.api.openapi import browser_pages, ecma_pattern
from shared.adapters.pool_store import RedisPoolStore
from shared.adapters.session_store import RedisSessionStore
from shared.adapters.template_files import load_templates
from shared.jobs import PROVISION
from shared.runtime import Runtime
from tests.doubles import RecordingCelery
from tests.unit.test_api import ADMIN, FRONTEND, FakeClock, make_settings

DOCUMENT_URI = "urn:labvirt:openapi"
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
RULE_ARGUMENT = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


@pytest.fixture
def runtime(redis_url: str) -> Iterator[Runtime]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield Runtime(
        settings=make_settings(),
        redis=client,
        sessions=RedisSessionStore(client),
        templates=load_templates(None),
        celery=RecordingCelery(),  # type: ignore[arg-type]
        clock=FakeClock(),
        pools=RedisPoolStore(client, prefix=f"test-openapi-{uuid.uuid4().hex[:8]}"),
    )
    client.flushdb()
    client.close()


@pytest.fixture
def app(runtime: Runtime) -> Flask:
    return create_app(runtime)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def document(client: FlaskClient) -> dict[str, Any]:
    response = client.get("/openapi.json")  # no token: the contract is public
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body: dict[str, Any] = response.json
    return body


class Contract:
    """Checks answers against the document: status, media type, headers and body."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        resource = Resource.from_contents(document, default_specification=DRAFT202012)
        self.registry: Registry[Any] = Registry().with_resource(DOCUMENT_URI, resource)

    def check(self, response: TestResponse, method: str, path: str) -> None:
        operation = self.document["paths"][path][method.lower()]
        status = str(response.status_code)
        assert status in operation["responses"], (
            f"{method} {path} answered {status}, which it does not document: "
            f"{response.get_data(as_text=True)}"
        )
        answer = operation["responses"][status]
        media = response.mimetype
        assert media in answer["content"], (method, path, status, media)
        for name, header in answer.get("headers", {}).items():
            if header.get("required"):
                assert name in response.headers, (method, path, status, name)
        steps = ("paths", _escape(path), method.lower(), "responses", status, "content")
        pointer = "/".join(("#", *steps, _escape(media), "schema"))
        validator = Draft202012Validator(
            {"$ref": DOCUMENT_URI + pointer},
            registry=self.registry,
            format_checker=FormatChecker(),
        )
        body = response.json if response.is_json else response.get_data(as_text=True)
        problems = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(body)]
        assert not problems, (method, path, status, problems, body)


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def call(
    client: FlaskClient, contract: Contract, method: str, path: str, url: str, **kw: Any
) -> TestResponse:
    """Call ``url`` (an instance of the documented ``path``) and check the answer."""
    token = kw.pop("token", None)
    headers = dict(kw.pop("headers", {}))
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    response = client.open(url, method=method, headers=headers, **kw)
    contract.check(response, method, path)
    return response


def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    validate(document)
    assert document["openapi"].startswith("3.1")
    assert set(document["components"]["securitySchemes"]) == {
        "frontendToken",
        "adminToken",
        "sessionToken",
        "metricsToken",
    }


def test_every_route_of_the_app_is_documented_and_nothing_else(
    app: Flask, document: dict[str, Any]
) -> None:
    # Browser pages (the operators' dashboard) are not API routes: marked as such, and all
    # under /ui/ops, so no API route can leave the document by that door.
    pages = browser_pages(app)
    assert pages, "the dashboard's routes are marked as browser pages"
    assert all(
        rule.rule.startswith("/ui/ops")
        for rule in app.url_map.iter_rules()
        if rule.endpoint in pages
    )
    served = {
        (RULE_ARGUMENT.sub(r"{\1}", rule.rule), method.lower())
        for rule in app.url_map.iter_rules()
        if rule.endpoint not in pages
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}
    }
    documented = {
        (path, method)
        for path, item in document["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }
    assert served == documented
    operation_ids = [
        operation["operationId"]
        for item in document["paths"].values()
        for method, operation in item.items()
        if method in HTTP_METHODS
    ]
    assert len(operation_ids) == len(set(operation_ids))
    tags = {tag for _, _, operation in operations(document) for tag in operation["tags"]}
    assert tags == {tag["name"] for tag in document["tags"]}  # every one described


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield path, method, operation


def test_every_error_is_a_problem_and_every_token_route_documents_401_and_403(
    document: dict[str, Any],
) -> None:
    for path, method, operation in operations(document):
        where = f"{method} {path}"
        for status, answer in operation["responses"].items():
            if int(status) >= 400:
                assert answer["content"] == {
                    "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
                }, where
        if operation["security"]:
            assert {"401", "403"} <= set(operation["responses"]), where
            assert "Retry-After" not in operation["responses"]["401"].get("headers", {}), where
        if "429" in operation["responses"]:
            assert operation["responses"]["429"]["headers"]["Retry-After"]["required"], where


def test_routes_name_the_tokens_they_accept(document: dict[str, Any]) -> None:
    def accepted(path: str, method: str) -> set[str]:
        return {name for option in document["paths"][path][method]["security"] for name in option}

    assert accepted("/v1/sessions", "post") == {"frontendToken", "adminToken"}
    assert accepted("/v1/sessions/{session_id}", "get") == {
        "frontendToken",
        "adminToken",
        "sessionToken",
    }
    assert accepted("/v1/admin/pools", "get") == {"adminToken"}
    assert accepted("/metrics", "get") == {"adminToken", "metricsToken"}
    for public in ("/healthz", "/readyz", "/openapi.json", "/docs"):
        assert accepted(public, "get") == set()


def test_path_parameters_carry_the_patterns_the_api_checks(document: dict[str, Any]) -> None:
    [session_id] = document["paths"]["/v1/sessions/{session_id}"]["parameters"]
    assert session_id["schema"]["pattern"] == r"^s-[0-9a-f]{24}$"
    [failure_id] = document["paths"]["/v1/admin/failed/{failure_id}"]["parameters"]
    assert failure_id["schema"]["pattern"] == r"^f-[0-9a-f]{20}$"


def test_creates_document_the_idempotency_key_and_the_links_to_the_session(
    document: dict[str, Any],
) -> None:
    create = document["paths"]["/v1/sessions"]["post"]
    assert [p["name"] for p in create["parameters"] if p["in"] == "header"] == ["Idempotency-Key"]
    assert {"409", "422", "429", "503"} <= set(create["responses"])
    links = create["responses"]["201"]["links"]
    assert links["GetSession"] == {
        "operationId": "sessions.get_session",
        "parameters": {"session_id": "$response.body#/id"},
    }
    followed = {link["operationId"] for link in links.values()}
    known = {operation["operationId"] for _, _, operation in operations(document)}
    assert followed <= known


@pytest.mark.parametrize(
    ("python", "ecma"),
    [
        (r"[A-Za-z]{2}\Z", r"^[A-Za-z]{2}$"),
        (r"^[a-z]+$", r"^[a-z]+$"),
        (r"s-[0-9a-f]+", r"^s-[0-9a-f]+"),  # re.match: anchored at the start only
    ],
)
def test_regexp_patterns_are_written_as_json_schema_reads_them(python: str, ecma: str) -> None:
    assert ecma_pattern(python) == ecma


def test_session_answers_match_the_document(client: FlaskClient, document: dict[str, Any]) -> None:
    contract = Contract(document)
    created = call(
        client,
        contract,
        "POST",
        "/v1/sessions",
        "/v1/sessions",
        token=FRONTEND,
        json={"template": "ubuntu", "user": "alice"},
        headers={"Idempotency-Key": "first-try"},
    )
    assert created.status_code == 201
    session_id, token = created.json["id"], created.json["token"]
    again = call(
        client,
        contract,
        "POST",
        "/v1/sessions",
        "/v1/sessions",
        token=FRONTEND,
        json={"template": "ubuntu", "user": "alice"},
    )
    assert (again.status_code, again.json["reconnected"]) == (200, True)
    one = "/v1/sessions/{session_id}"
    url = f"/v1/sessions/{session_id}"
    assert call(client, contract, "GET", one, url, token=token).status_code == 200
    heartbeat = call(
        client, contract, "POST", one + "/heartbeat", url + "/heartbeat", json={"token": token}
    )
    assert heartbeat.status_code == 200
    ticket = call(client, contract, "POST", one + "/tickets", url + "/tickets", token=token)
    assert ticket.status_code == 201
    extended = call(client, contract, "POST", one + "/extend", url + "/extend", token=FRONTEND)
    assert extended.status_code in (200, 409)
    closed = call(client, contract, "POST", one + "/close", url + "/close", data={"token": token})
    assert closed.status_code == 202
    assert call(client, contract, "DELETE", one, url, token=FRONTEND).status_code == 202
    closed_again = call(client, contract, "POST", one + "/tickets", url + "/tickets", token=token)
    assert closed_again.status_code == 409
    templates = call(client, contract, "GET", "/v1/templates", "/v1/templates", token=ADMIN)
    assert templates.status_code == 200


def test_problems_match_the_document(client: FlaskClient, document: dict[str, Any]) -> None:
    contract = Contract(document)
    absent = "/v1/sessions/s-" + "0" * 24
    assert call(client, contract, "GET", "/v1/sessions/{session_id}", absent).status_code == 401
    not_found = call(client, contract, "GET", "/v1/sessions/{session_id}", absent, token=FRONTEND)
    assert not_found.status_code == 404
    unknown = call(
        client,
        contract,
        "POST",
        "/v1/sessions",
        "/v1/sessions",
        token=FRONTEND,
        json={"template": "nope", "user": "alice"},
    )
    assert (unknown.status_code, unknown.json["code"]) == (422, "unknown_template")
    assert unknown.json["templates"]  # a context member the document allows
    invalid = call(
        client,
        contract,
        "POST",
        "/v1/sessions",
        "/v1/sessions",
        token=FRONTEND,
        json={"template": "ubuntu", "user": "alice", "colour": "red"},
    )
    assert invalid.status_code == 400
    assert invalid.json["errors"] == [{"pointer": "/colour", "detail": "Unknown field."}]
    not_json = call(
        client, contract, "POST", "/v1/sessions", "/v1/sessions", token=FRONTEND, data="x=1"
    )
    assert not_json.status_code == 415
    bad_query = call(
        client, contract, "GET", "/v1/admin/failed", "/v1/admin/failed?limit=0", token=ADMIN
    )
    assert bad_query.status_code == 400
    frontend_on_admin = call(
        client, contract, "GET", "/v1/admin/regions", "/v1/admin/regions", token=FRONTEND
    )
    assert frontend_on_admin.status_code in (401, 403)


def test_operator_answers_match_the_document(
    client: FlaskClient, document: dict[str, Any], runtime: Runtime
) -> None:
    contract = Contract(document)
    call(client, contract, "POST", "/v1/sessions", "/v1/sessions", token=FRONTEND,
         json={"template": "ubuntu", "user": "bob"})  # fmt: skip
    letter = runtime.dead_letters.record(
        task=PROVISION,
        payload={"session_id": "s-" + "a" * 24},
        task_id="celery-task-1",
        error=RuntimeError("VM lv-x-ubuntu reached phase Failed"),
        traceback="Traceback (most recent call last):\n  ...\nRuntimeError: boom",
    )
    failed = "/v1/admin/failed/{failure_id}"
    checks = [
        ("GET", "/v1/admin/pools", "/v1/admin/pools", None),
        ("PUT", "/v1/admin/pools", "/v1/admin/pools", {"paused": True}),
        ("PUT", "/v1/admin/pools/{template}", "/v1/admin/pools/ubuntu", {"size": 2}),
        ("GET", "/v1/admin/regions", "/v1/admin/regions", None),
        ("PUT", "/v1/admin/regions/{region}", "/v1/admin/regions/local", {"drained": True}),
        ("GET", "/v1/admin/sessions", "/v1/admin/sessions?user=bob", None),
        ("GET", "/v1/admin/failed", "/v1/admin/failed?limit=5", None),
        ("GET", failed, f"/v1/admin/failed/{letter.id}", None),
        ("POST", failed + "/requeue", f"/v1/admin/failed/{letter.id}/requeue", None),
        ("POST", "/v1/admin/failed/requeue", "/v1/admin/failed/requeue", {"task": PROVISION}),
        ("DELETE", failed, f"/v1/admin/failed/{letter.id}", None),
    ]
    for method, path, url, body in checks:
        response = call(client, contract, method, path, url, token=ADMIN, json=body)
        assert response.status_code == 200, (method, url, response.json)


def test_health_and_the_docs_page_match_the_document(
    client: FlaskClient, document: dict[str, Any]
) -> None:
    contract = Contract(document)
    assert call(client, contract, "GET", "/healthz", "/healthz").status_code == 200
    assert call(client, contract, "GET", "/readyz", "/readyz").status_code == 200
    page = call(client, contract, "GET", "/docs", "/docs")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert '"/openapi.json"' in html
    assets = re.findall(r'(?:src|href)="/docs/vendor/([^"]+)"', html)
    assert sorted(assets) == ["swagger-ui-bundle.js", "swagger-ui.css"]
    for asset in assets:
        served = call(client, contract, "GET", "/docs/vendor/{asset}", f"/docs/vendor/{asset}")
        assert served.status_code == 200, f"{asset}: run `make install` (npm ci)"
        assert len(served.get_data()) > 1000
    missing = call(client, contract, "GET", "/docs/vendor/{asset}", "/docs/vendor/nope.js")
    assert missing.status_code == 404
