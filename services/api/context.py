"""What every view needs from a request: the runtime, the caller, a validated body."""

from __future__ import annotations

import json
import re
from typing import Any

import structlog
from flask import current_app, request
from marshmallow import Schema, ValidationError

from services.api.auth import Caller, Role, bearer_token, identify
from services.api.errors import ApiError, invalid_request, session_not_found, unauthorized
from services.api.schemas import TokenBody
from shared.domain.sessions import Session
from shared.runtime import Runtime

RUNTIME_KEY = "labvirt.runtime"
_SESSION_ID = re.compile(r"^s-[0-9a-f]{24}$")


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
    who = caller()
    if who.role not in (Role.FRONTEND, Role.ADMIN):
        raise unauthorized("this call needs a frontend token")
    return who


def admin_caller() -> Caller:
    who = caller()
    if who.role is not Role.ADMIN:
        raise unauthorized("this call needs an admin token")
    return who


def session_for(session_id: str, who: Caller) -> Session:
    """The session, if the caller may see it: platform tokens see all, a session token one."""
    if not _SESSION_ID.match(session_id):
        raise session_not_found()
    session = runtime().sessions.get(session_id)
    if session is None:
        raise session_not_found()
    if who.role is None and not session.token_matches(who.token):
        raise session_not_found()
    structlog.contextvars.bind_contextvars(session_id=session.id, template=session.template)
    return session


def body(schema: type[Schema], *, require_json: bool = False) -> dict[str, Any]:
    """The validated body: JSON, or a form (what ``navigator.sendBeacon`` sends)."""
    if request.is_json:
        raw = request.get_json(silent=True)
        if raw is None:
            raise ApiError(400, "invalid_json", "the body is not valid JSON")
    elif require_json:
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    elif request.form:
        raw = request.form.to_dict()
    elif request.get_data(cache=True):
        # sendBeacon with a text/plain Blob that carries JSON.
        try:
            raw = json.loads(request.get_data(cache=True, as_text=True))
        except ValueError as exc:
            raise ApiError(400, "invalid_json", "the body is not valid JSON") from exc
    else:
        raw = {}
    if not isinstance(raw, dict):
        raise invalid_request(None, "the body must be a JSON object")
    try:
        loaded: dict[str, Any] = schema().load(raw)
    except ValidationError as exc:
        raise invalid_request(exc.messages) from exc
    return loaded
