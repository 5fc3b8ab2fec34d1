"""Errors everywhere as ``application/problem+json`` (RFC 9457), one shape:

    {"type": "urn:labvirt:problem:<code>", "title": "...", "status": 404,
     "detail": "...", "code": "<code>", "errors": [{"pointer": "/user", "detail": "..."}], ...}

``code`` is the stable key clients switch on; ``errors`` lists field-level problems (a JSON
pointer into the request body, or into the query string as ``#/query/<name>``); any other
member is context of that kind of problem (``templates``, ``regions``, ``sessions``...).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import redis
import structlog
from flask import Flask, Response, json
from marshmallow import INCLUDE, Schema, fields
from werkzeug.exceptions import HTTPException

from shared.problems import PROBLEM_MEDIA_TYPE, QUERY_POINTER, field_problems, problem_body

log = structlog.get_logger(__name__)


class FieldProblem(Schema):
    pointer = fields.String(
        required=True, metadata={"description": "JSON pointer to the field, e.g. /location/lat"}
    )
    detail = fields.String(required=True)


class ProblemSchema(Schema):
    """The body of every error answer (RFC 9457, with labvirt's ``code`` and ``errors``)."""

    type = fields.String(
        required=True, metadata={"example": "urn:labvirt:problem:session_not_found"}
    )
    title = fields.String(required=True)
    status = fields.Integer(required=True)
    detail = fields.String(required=True)
    code = fields.String(required=True, metadata={"description": "stable machine-readable key"})
    errors = fields.List(fields.Nested(FieldProblem))

    class Meta:
        # Problems of some kinds carry context members of their own (the document says
        # additionalProperties: true).
        unknown = INCLUDE


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        details: Mapping[str, Any] | None = None,
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = dict(details or {})
        self.errors = errors
        self.headers = headers or {}


def unauthorized(message: str = "a valid bearer token is required") -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


def forbidden(message: str) -> ApiError:
    """A valid credential that does not reach this route (a frontend token on an admin one)."""
    return ApiError(403, "forbidden", message)


def session_not_found() -> ApiError:
    # The same answer for "absent" and "not yours": a token reveals no other session.
    return ApiError(404, "session_not_found", "no such session")


def invalid_request(messages: Any, message: str = "the request body is invalid") -> ApiError:
    """400 with field-level problems from marshmallow's messages (or none)."""
    return ApiError(400, "invalid_request", message, errors=field_problems(messages))


def invalid_query(messages: Any, message: str = "the query is invalid") -> ApiError:
    """400 with problems pointing into the query string (``#/query/<name>``)."""
    return ApiError(400, "invalid_request", message, errors=field_problems(messages, QUERY_POINTER))


def problem_response(
    status: int,
    code: str,
    detail: str,
    *,
    details: Mapping[str, Any] | None = None,
    errors: list[dict[str, str]] | None = None,
    headers: Mapping[str, str] | list[tuple[str, str]] | None = None,
) -> Response:
    body = problem_body(status, code, detail, errors=errors, context=details)
    response = Response(json.dumps(body), status=status, mimetype=PROBLEM_MEDIA_TYPE)
    for key, value in headers.items() if isinstance(headers, Mapping) else headers or []:
        response.headers[key] = value
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def api_error(exc: ApiError) -> Response:
        return problem_response(
            exc.status,
            exc.code,
            exc.message,
            details=exc.details,
            errors=exc.errors,
            headers=exc.headers,
        )

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        code = (exc.name or "error").lower().replace(" ", "_")
        # Keep the exception's own headers (a 405 must say Allow), but not its HTML type.
        headers = [(k, v) for k, v in exc.get_headers() if k.lower() != "content-type"]
        return problem_response(exc.code or 500, code, exc.description or exc.name, headers=headers)

    @app.errorhandler(redis.RedisError)
    def redis_error(exc: redis.RedisError) -> Response:
        log.error("api.redis_unavailable", error=str(exc))
        return problem_response(
            503, "unavailable", "session storage is unavailable", headers={"Retry-After": "2"}
        )
