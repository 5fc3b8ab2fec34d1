"""The API's contract: an OpenAPI 3.1 document built from the marshmallow schemas the views
load requests with and dump answers with.

Each view carries its operation (``@documented(...)``, under the route decorator);
``openapi_document(app)`` walks the app's ``url_map``, so the document has every route the
app serves that is documented, and nothing else (a unit test checks that none is left out).
Errors, whatever the route, are ``application/problem+json`` bodies of ``ProblemSchema``;
the ones every route of a kind can answer (401/403 with a token, 400/413 with a body, 503
when Redis is down) are added here, the rest are named by the view.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from importlib.metadata import version
from typing import Any, Final, TypeVar

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from apispec.ext.marshmallow.openapi import OpenAPIConverter
from flask import Flask
from marshmallow import Schema, fields

from services.api.admin_schemas import FAILURE_ID_PATTERN
from services.api.errors import ProblemSchema
from services.api.schemas import SESSION_ID_PATTERN
from shared.problems import PROBLEM_MEDIA_TYPE

OPENAPI_VERSION: Final = "3.1.0"
JSON: Final = "application/json"
FORM: Final = "application/x-www-form-urlencoded"
_OPERATION: Final = "__labvirt_operation__"
_BROWSER_PAGE: Final = "__labvirt_browser_page__"
_IGNORED_METHODS: Final = frozenset({"HEAD", "OPTIONS"})
_RULE_ARGUMENT: Final = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")

View = TypeVar("View", bound=Callable[..., Any])


class Credential(StrEnum):
    """The bearer tokens labvirt knows; the value is the security scheme's name."""

    FRONTEND = "frontendToken"
    ADMIN = "adminToken"
    SESSION = "sessionToken"
    METRICS = "metricsToken"


PLATFORM: Final = (Credential.FRONTEND, Credential.ADMIN)
SESSION_HOLDERS: Final = (Credential.FRONTEND, Credential.ADMIN, Credential.SESSION)
OPERATORS: Final = (Credential.ADMIN,)

SECURITY_SCHEMES: Final = {
    Credential.FRONTEND: "A frontend token (LABVIRT_FRONTEND_TOKENS): the learning platform's "
    "server, for any session.",
    Credential.ADMIN: "An admin token (LABVIRT_ADMIN_TOKENS): operators; it also reaches every "
    "frontend route.",
    Credential.SESSION: "A session token, handed out once when the session is created: one "
    "session's routes only.",
    Credential.METRICS: "A scrape token (LABVIRT_METRICS_TOKENS): /metrics only.",
}

# The blueprints' names tag their operations; this is their order in the document.
TAGS: Final = {
    "sessions": "Sessions, templates and health: what a learning platform calls.",
    "admin": "Warm pools (admin token).",
    "admin_regions": "Regions (admin token).",
    "admin_failed": "Tasks that failed for good, and every session (admin token).",
    "docs": "This contract.",
    "metrics": "Prometheus metrics (admin or scrape token).",
}

# Path parameters by name, wherever they appear.
PATH_PARAMETERS: Final[Mapping[str, Mapping[str, Any]]] = {
    "session_id": {"type": "string", "pattern": SESSION_ID_PATTERN},
    "failure_id": {"type": "string", "pattern": FAILURE_ID_PATTERN},
    "template": {"type": "string", "minLength": 1, "maxLength": 63, "example": "ubuntu"},
    "region": {"type": "string", "minLength": 1, "maxLength": 63, "example": "local"},
}

RETRY_AFTER: Final = {
    "description": "seconds to wait before trying again",
    "schema": {"type": "integer", "minimum": 0},
}
ERRORS: Final[Mapping[int, str]] = {
    400: "The request is invalid: `errors` points at each bad field (`/field` in the body, "
    "`#/query/<name>`, `#/headers/<name>`).",
    401: "No bearer token, or one that opens nothing here.",
    403: "A valid token that does not reach this route (a frontend token on an admin route).",
    404: "No such resource (or not one this token may see).",
    409: "The resource's state refuses the change; `code` says which rule.",
    413: "The body is larger than the API accepts.",
    415: "The body must be application/json.",
    422: "Understood, but refers to something labvirt does not have or cannot do.",
    429: "Too many requests: wait `Retry-After` seconds.",
    503: "Unavailable for now (session storage down, or no room): retry, after `Retry-After` "
    "seconds when given.",
}
# Headers error answers carry: name -> (header, required).
_ERROR_HEADERS: Final[Mapping[int, Mapping[str, tuple[Mapping[str, Any], bool]]]] = {
    401: {"WWW-Authenticate": ({"schema": {"type": "string", "example": "Bearer"}}, True)},
    409: {"Retry-After": (RETRY_AFTER, False)},
    429: {"Retry-After": (RETRY_AFTER, True)},
    503: {"Retry-After": (RETRY_AFTER, False)},
}


@dataclass(frozen=True)
class RawContent:
    """An answer that is not a marshmallow schema's: media types and their JSON Schemas."""

    media: Mapping[str, Mapping[str, Any]]


SchemaLike = type[Schema] | Schema | RawContent


@dataclass(frozen=True, kw_only=True)
class Operation:
    """One route's place in the contract (its description is the view's docstring).

    ``answers``: each success status and its body; ``errors``: error statuses beyond the ones
    the route's kind implies, and what they mean here ("" for the usual meaning); ``headers``:
    header parameters; ``answer_headers``: headers every success carries; ``links``: where a
    success leads (``link_to``); ``uses_storage``: False for routes that answer without Redis.
    """

    summary: str
    answers: Mapping[int, SchemaLike]
    errors: Mapping[int, str] = field(default_factory=dict)
    security: tuple[Credential, ...] = ()
    body: type[Schema] | None = None
    body_media: tuple[str, ...] = (JSON,)
    body_required: bool = True
    query: type[Schema] | None = None
    headers: tuple[Mapping[str, Any], ...] = ()
    answer_headers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    links: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    path_parameters: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    uses_storage: bool = True


def documented(**operation: Any) -> Callable[[View], View]:
    """Attach the view's operation (see ``Operation``) for ``openapi_document``."""
    described = Operation(**operation)

    def attach(view: View) -> View:
        setattr(view, _OPERATION, described)
        return view

    return attach


def browser_page(view: View) -> View:
    """Mark a view as part of a page for people (the operators' dashboard): HTML and forms,
    signed in with a cookie, not part of the contract. ``browser_pages`` lists them."""
    setattr(view, _BROWSER_PAGE, True)
    return view


def browser_pages(app: Flask) -> frozenset[str]:
    """The endpoints of ``app`` marked ``browser_page``: every route the document leaves
    out on purpose (a unit test holds every other route to the document)."""
    return frozenset(
        endpoint
        for endpoint, view in app.view_functions.items()
        if getattr(view, _BROWSER_PAGE, False)
    )


def header(name: str, description: str, **schema: Any) -> dict[str, Any]:
    return {"in": "header", "name": name, "description": description, "schema": schema}


def link_to(operation_id: str, **parameters: str) -> dict[str, Any]:
    """A link for stateful clients: ``parameters`` are runtime expressions."""
    return {"operationId": operation_id, "parameters": parameters}


def openapi_document(app: Flask) -> dict[str, Any]:
    spec = APISpec(
        title="labvirt API",
        version=version("labvirt"),
        openapi_version=OPENAPI_VERSION,
        plugins=[_Marshmallow()],
        info={
            "description": "Disposable, isolated Linux environments on KubeVirt for learning "
            "platforms. Errors are application/problem+json (RFC 9457): switch on `code`."
        },
    )
    for credential, description in SECURITY_SCHEMES.items():
        spec.components.security_scheme(
            credential.value, {"type": "http", "scheme": "bearer", "description": description}
        )
    spec.components.schema("Problem", schema=ProblemSchema)
    for name, description in TAGS.items():
        spec.tag({"name": name, "description": description})
    paths: dict[str, dict[str, Any]] = {}
    parameters: dict[str, list[dict[str, Any]]] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        view = app.view_functions[rule.endpoint]
        described: Operation | None = getattr(view, _OPERATION, None)
        if described is None:
            continue
        path = _RULE_ARGUMENT.sub(r"{\1}", rule.rule)
        parameters[path] = [
            _path_parameter(name, described) for name in _RULE_ARGUMENT.findall(rule.rule)
        ]
        for method in sorted((rule.methods or set()) - _IGNORED_METHODS):
            paths.setdefault(path, {})[method.lower()] = _operation(
                rule.endpoint, described, inspect.getdoc(view)
            )
    for path, operations in paths.items():
        spec.path(path=path, operations=operations, parameters=parameters[path])
    return spec.to_dict()


def ecma_pattern(python: str) -> str:
    """A ``Regexp`` validator's pattern as JSON Schema means it (ECMA-262, found anywhere).

    marshmallow's ``Regexp`` matches from the start (``re.match``) and labvirt's patterns end
    with ``\\Z`` (``$`` would let a trailing newline through): ``^...$`` says the same.
    """
    pattern = python.removeprefix("^")
    if pattern.endswith(r"\Z"):
        pattern = pattern[: -len(r"\Z")] + "$"
    return "^" + pattern


class _Converter(OpenAPIConverter):
    def field2pattern(self, field: fields.Field[Any], **_: Any) -> dict[str, Any]:
        for validator in field.validators:
            regex = getattr(validator, "regex", None)
            if isinstance(regex, re.Pattern):
                return {"pattern": ecma_pattern(regex.pattern)}
        return {}


class _Marshmallow(MarshmallowPlugin):
    Converter = _Converter


def _path_parameter(name: str, described: Operation) -> dict[str, Any]:
    schema = described.path_parameters.get(name) or PATH_PARAMETERS[name]
    return {"in": "path", "name": name, "required": True, "schema": dict(schema)}


def _operation(endpoint: str, described: Operation, docstring: str | None) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": endpoint,
        "summary": described.summary,
        "tags": [endpoint.split(".", 1)[0]],
        "security": [{credential.value: []} for credential in described.security],
        "responses": {
            str(status): _answer(status, content, described)
            for status, content in described.answers.items()
        },
    }
    if docstring:
        operation["description"] = docstring
    query = [{"in": "query", "schema": described.query}] if described.query else []
    if query or described.headers:
        operation["parameters"] = [*query, *described.headers]
    if described.body is not None:
        operation["requestBody"] = {
            "required": described.body_required,
            "content": {media: {"schema": described.body} for media in described.body_media},
        }
    for status, description in sorted(_errors(described).items()):
        operation["responses"][str(status)] = _problem(status, description)
    return operation


def _answer(status: int, content: SchemaLike, described: Operation) -> dict[str, Any]:
    media = content.media if isinstance(content, RawContent) else {JSON: content}
    answer: dict[str, Any] = {
        "description": _STATUS_TEXT.get(status, "Success"),
        "content": {name: {"schema": schema} for name, schema in media.items()},
    }
    if described.answer_headers:
        answer["headers"] = {
            name: dict(value, required=True) for name, value in described.answer_headers.items()
        }
    if described.links and 200 <= status < 300:
        answer["links"] = dict(described.links)
    return answer


_STATUS_TEXT: Final = {200: "OK", 201: "Created", 202: "Accepted"}


def _errors(described: Operation) -> dict[int, str]:
    """The route's error answers: the ones its kind implies, then its own."""
    errors: dict[int, str] = {}
    if described.security:
        errors |= {401: ERRORS[401], 403: ERRORS[403]}
    if described.body is not None:
        errors |= {400: ERRORS[400], 413: ERRORS[413]}
        if described.body_required and described.body_media == (JSON,):
            errors[415] = ERRORS[415]
    if described.query is not None:
        errors[400] = ERRORS[400]
    if described.uses_storage:
        errors[503] = ERRORS[503]
    for status, description in described.errors.items():
        errors[status] = description or ERRORS[status]
    return errors


def _problem(status: int, description: str) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {PROBLEM_MEDIA_TYPE: {"schema": ProblemSchema}},
    }
    headers = _ERROR_HEADERS.get(status)
    if headers:
        answer["headers"] = {
            name: dict(value, required=required) for name, (value, required) in headers.items()
        }
    return answer
