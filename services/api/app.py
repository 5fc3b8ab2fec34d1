"""The HTTP API: validate, call one domain function, enqueue, answer. Never talks to Kubernetes.

Errors are JSON everywhere: ``{"error": {"code", "message", "details"?}}`` with a 4xx for
anything the caller can fix.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import redis
import structlog
from flask import Flask, Response, g, jsonify, request
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException

from services.api.auth import Caller, Role, bearer_token, identify
from services.api.schemas import CreateSessionRequest, TokenBody, session_body
from shared.adapters.session_store import SessionNotFound
from shared.domain.sessions import (
    IllegalTransition,
    InvalidUser,
    Session,
    SessionState,
    open_session,
)
from shared.jobs import PROVISION, PROVISION_QUEUE, TEARDOWN, TEARDOWN_QUEUE
from shared.runtime import Runtime

log = structlog.get_logger(__name__)

_SESSION_ID = re.compile(r"^s-[0-9a-f]{24}$")
MAX_BODY_BYTES = 64 * 1024


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, *,
                 details: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers or {}


def _unauthorized(message: str = "a valid bearer token is required") -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


def _session_not_found() -> ApiError:
    # The same answer for "absent" and "not yours": a token reveals no other session.
    return ApiError(404, "session_not_found", "no such session")


def create_app(runtime: Runtime) -> Flask:
    app = Flask("labvirt.api")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False  # type: ignore[attr-defined]
    settings = runtime.settings

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

    @app.before_request
    def bind_request() -> None:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(process="api", method=request.method,
                                               path=request.path)
        g.started = time.perf_counter()

    @app.after_request
    def log_request(response: Response) -> Response:
        elapsed = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000
        log.info("api.request", status=response.status_code, ms=round(elapsed, 1))
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    # -- helpers ---------------------------------------------------------------------------

    def caller(*, allow_body_token: bool = False) -> Caller:
        token = bearer_token(request)
        if token is None and allow_body_token:
            token = _body(TokenBody).get("token")
        if token is None:
            raise _unauthorized()
        return identify(token, frontend=settings.frontend_tokens, admin=settings.admin_tokens)

    def platform_caller() -> Caller:
        who = caller()
        if who.role not in (Role.FRONTEND, Role.ADMIN):
            raise _unauthorized("this call needs a frontend token")
        return who

    def session_for(session_id: str, who: Caller) -> Session:
        if not _SESSION_ID.match(session_id):
            raise _session_not_found()
        session = runtime.sessions.get(session_id)
        if session is None:
            raise _session_not_found()
        if who.role is None and not session.token_matches(who.token):
            raise _session_not_found()
        structlog.contextvars.bind_contextvars(session_id=session.id, template=session.template)
        return session

    def enqueue(task: str, session_id: str, queue: str) -> None:
        runtime.celery.send_task(task, args=[session_id], queue=queue)

    def close(session_id: str, *, reason: str, allow_body_token: bool) -> tuple[Response, int]:
        who = caller(allow_body_token=allow_body_token)
        session = session_for(session_id, who)
        now = runtime.clock()
        moved: list[bool] = []

        def change(current: Session) -> Session:
            moved.clear()
            if current.state not in (SessionState.PROVISIONING, SessionState.READY):
                return current
            moved.append(True)
            return current.transition(SessionState.TERMINATING, at=now, reason=reason)

        try:
            session = runtime.sessions.update(session.id, change)
        except SessionNotFound as exc:  # a finished session's document expired meanwhile
            raise _session_not_found() from exc
        if moved:
            enqueue(TEARDOWN, session.id, TEARDOWN_QUEUE)
            log.info("session.closing", reason=reason)
        return jsonify(session_body(session)), 202

    # -- routes ----------------------------------------------------------------------------

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "ok"})

    @app.get("/readyz")
    def readyz() -> tuple[Response, int]:
        try:
            runtime.redis.ping()
        except redis.RedisError as exc:
            return jsonify({"status": "unavailable", "redis": str(exc)}), 503
        return jsonify({"status": "ok"}), 200

    @app.get("/v1/templates")
    def list_templates() -> Response:
        platform_caller()
        return jsonify({"templates": [
            {
                "name": t.name,
                "description": t.description,
                "max_lifetime_seconds": t.max_lifetime_seconds,
                "idle_timeout_seconds": settings.idle_timeout_seconds or t.idle_timeout_seconds,
                "vms": [
                    {"name": vm.name, "hostname": vm.hostname, "cpu_cores": vm.cpu_cores,
                     "memory": vm.memory}
                    for vm in t.vms
                ],
            }
            for t in sorted(runtime.templates.values(), key=lambda t: t.name)
        ], "regions": list(settings.regions), "default_region": settings.default_region})

    @app.post("/v1/sessions")
    def create_session() -> tuple[Response, int, dict[str, str]]:
        platform_caller()
        data = _body(CreateSessionRequest, require_json=True)
        template = runtime.templates.get(data["template"])
        if template is None:
            raise ApiError(422, "unknown_template", f"no template named {data['template']!r}",
                           details={"templates": sorted(runtime.templates)})
        region = data["region"] or settings.default_region
        if region not in settings.regions:
            raise ApiError(422, "unknown_region", f"no cluster serves region {region!r}",
                           details={"regions": list(settings.regions)})
        try:
            session, token = open_session(
                user=data["user"],
                template=template.name,
                region=region,
                max_lifetime_seconds=template.max_lifetime_seconds,
                idle_timeout_seconds=settings.idle_timeout_seconds
                or template.idle_timeout_seconds,
                now=runtime.clock(),
            )
        except InvalidUser as exc:
            raise ApiError(400, "invalid_request", "the request body is invalid",
                           details={"user": [str(exc)]}) from exc
        runtime.sessions.add(session)
        structlog.contextvars.bind_contextvars(session_id=session.id, template=session.template)
        try:
            enqueue(PROVISION, session.id, PROVISION_QUEUE)
        except Exception as exc:
            runtime.sessions.update(session.id, lambda s: s.transition(
                SessionState.FAILED, at=runtime.clock(), reason="could not queue provisioning"))
            log.exception("session.enqueue_failed")
            raise ApiError(503, "unavailable", "could not queue the environment; try again",
                           headers={"Retry-After": "2"}) from exc
        log.info("session.created", user=session.user, region=region)
        return jsonify(session_body(session, token=token)), 201, {
            "Location": f"/v1/sessions/{session.id}"
        }

    @app.get("/v1/sessions/<session_id>")
    def get_session(session_id: str) -> Response:
        return jsonify(session_body(session_for(session_id, caller())))

    @app.delete("/v1/sessions/<session_id>")
    def delete_session(session_id: str) -> tuple[Response, int]:
        return close(session_id, reason="deleted", allow_body_token=False)

    @app.post("/v1/sessions/<session_id>/close")
    def close_session(session_id: str) -> tuple[Response, int]:
        return close(session_id, reason="closed", allow_body_token=True)

    @app.post("/v1/sessions/<session_id>/heartbeat")
    def heartbeat(session_id: str) -> Response:
        who = caller(allow_body_token=True)
        session = session_for(session_id, who)
        if session.is_final or session.state is SessionState.TERMINATING:
            raise ApiError(409, "session_closed", f"the session is {session.state.value}")
        now = runtime.clock()
        try:
            session = runtime.sessions.update(session.id, lambda s: _heartbeat(s, now))
        except SessionNotFound as exc:
            raise _session_not_found() from exc
        except IllegalTransition as exc:
            raise ApiError(409, "session_closed", str(exc)) from exc
        return jsonify(session_body(session))

    return app


def _heartbeat(session: Session, now: float) -> Session:
    if session.state not in (SessionState.PROVISIONING, SessionState.READY):
        raise IllegalTransition(session.state, session.state)
    return session.seen(now)


def _body(schema: type, *, require_json: bool = False) -> dict[str, Any]:
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
        # sendBeacon with a Blob of text/plain carrying JSON.
        import json  # noqa: PLC0415 - only on this rare path

        try:
            raw = json.loads(request.get_data(cache=True, as_text=True))
        except ValueError as exc:
            raise ApiError(400, "invalid_json", "the body is not valid JSON") from exc
    else:
        raw = {}
    if not isinstance(raw, dict):
        raise ApiError(400, "invalid_request", "the body must be a JSON object")
    try:
        loaded: dict[str, Any] = schema().load(raw)
    except ValidationError as exc:
        raise ApiError(400, "invalid_request", "the request body is invalid",
                       details=exc.messages) from exc
    return loaded


Clock = Callable[[], float]
