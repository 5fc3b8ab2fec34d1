"""What every view needs from a request: the runtime, the caller, a validated body."""

from __future__ import annotations

import functools
import re
from typing import Any, TypeVar

import structlog
from flask import current_app, request
from marshmallow import Schema, ValidationError

from services.api.auth import Caller, Role, bearer_token, identify
from services.api.errors import (
    ApiError,
    forbidden,
    invalid_query,
    invalid_request,
    session_not_found,
    unauthorized,
)
from services.api.schemas import TokenBody
from shared.domain.sessions import Session
from shared.runtime import Runtime

RUNTIME_KEY = "labvirt.runtime"
_SESSION_ID = re.compile(r"s-[0-9a-f]{24}")

S = TypeVar("S", bound=Schema)


@functools.cache
def schema_of(kind: type[S]) -> S:
    """The one instance of a schema class: building one costs several times what loading or
    dumping with it does, and a marshmallow schema keeps no state between calls."""
    return kind()


def runtime() -> Runtime:
    result: Runtime = current_app.extensions[RUNTIME_KEY]
    return result


def caller(*, allow_body_token: bool = False) -> Caller:
    token = bearer_token(request)
    if token is None and allow_body_token:
        token = body(TokenBody).get("token")
    if token is None:
        raise unauthorized()
    settings = runtime().settings
    return identify(token, frontend=settings.frontend_tokens, admin=settings.admin_tokens)


def platform_caller() -> Caller:
    # A session token is only recognisable on its own session's routes (labvirt keeps its
    # hash, not the token): anywhere else it is an unknown credential, so 401.
    who = caller()
    if who.role is None:
        raise unauthorized("this call needs a frontend or admin token")
    return who


def admin_caller() -> Caller:
    who = platform_caller()
    if who.role is not Role.ADMIN:
        raise forbidden("this call needs an admin token; a frontend token does not reach it")
    return who


def session_for(session_id: str, who: Caller) -> Session:
    """The session, if the caller may see it: platform tokens see all, a session token one."""
    if not _SESSION_ID.fullmatch(session_id):
        raise session_not_found()
    session = runtime().sessions.get(session_id)
    if session is None:
        raise session_not_found()
    if who.role is None and not session.token_matches(who.token):
        raise session_not_found()
    structlog.contextvars.bind_contextvars(session_id=session.id, template=session.template)
    return session


def query(schema: type[Schema]) -> dict[str, Any]:
    """The validated query string, by the schema the OpenAPI document lists it with; a
    parameter given twice counts once (the first), as Flask's ``args.get`` reads it."""
    raw = {key: request.args.get(key) for key in request.args}
    try:
        loaded: dict[str, Any] = schema_of(schema).load(raw)
    except ValidationError as exc:
        raise invalid_query(exc.messages) from exc
    return loaded


def body(schema: type[Schema], *, require_json: bool = False) -> dict[str, Any]:
    """The validated body: JSON, or a form (what ``navigator.sendBeacon`` sends)."""
    if request.is_json:
        raw = _json_body()
    elif require_json:
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    elif request.form:
        raw = request.form.to_dict()
    elif request.get_data(cache=True):
        raw = _json_body()  # sendBeacon with a text/plain Blob that carries JSON
    else:
        raw = {}
    if not isinstance(raw, dict):
        raise invalid_request(None, "the body must be a JSON object")
    try:
        loaded: dict[str, Any] = schema_of(schema).load(raw)
    except ValidationError as exc:
        raise invalid_request(exc.messages) from exc
    return loaded


def _json_body() -> Any:
    """The body parsed as JSON by the app's provider, which bounds its depth."""
    try:
        return current_app.json.loads(request.get_data(cache=True))
    except ValueError as exc:  # bad syntax, bad encoding, or nested too deep
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from exc
