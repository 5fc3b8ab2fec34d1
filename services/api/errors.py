"""JSON errors everywhere: ``{"error": {"code", "message", "details"?}}``."""

from __future__ import annotations

from typing import Any

import redis
import structlog
from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

log = structlog.get_logger(__name__)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers or {}


def unauthorized(message: str = "a valid bearer token is required") -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


def session_not_found() -> ApiError:
    # The same answer for "absent" and "not yours": a token reveals no other session.
    return ApiError(404, "session_not_found", "no such session")


def invalid_request(details: Any, message: str = "the request body is invalid") -> ApiError:
    return ApiError(400, "invalid_request", message, details=details)


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def api_error(exc: ApiError) -> tuple[Response, int, dict[str, str]]:
        error: dict[str, Any] = {"code": exc.code, "message": exc.message}
        if exc.details is not None:
            error["details"] = exc.details
        return jsonify({"error": error}), exc.status, exc.headers

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int, list[tuple[str, str]]]:
        code = (exc.name or "error").lower().replace(" ", "_")
        # Keep the exception's own headers (a 405 must say Allow), but not its HTML type.
        headers = [(k, v) for k, v in exc.get_headers() if k.lower() != "content-type"]
        body = {"error": {"code": code, "message": exc.description}}
        return jsonify(body), exc.code or 500, headers

    @app.errorhandler(redis.RedisError)
    def redis_error(exc: redis.RedisError) -> tuple[Response, int, dict[str, str]]:
        log.error("api.redis_unavailable", error=str(exc))
        body = {"error": {"code": "unavailable", "message": "session storage is unavailable"}}
        return jsonify(body), 503, {"Retry-After": "2"}
