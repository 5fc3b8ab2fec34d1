"""Session, template and health endpoints: validate, call one domain function, enqueue, answer."""

from __future__ import annotations

import redis
import structlog
from flask import Blueprint, Response, jsonify

from services.api.context import body, caller, platform_caller, runtime, session_for
from services.api.errors import ApiError, invalid_request, session_not_found
from services.api.schemas import CreateSessionRequest, session_body
from shared.adapters.session_store import SessionNotFound
from shared.domain.sessions import (
    IllegalTransition,
    InvalidUser,
    Session,
    SessionState,
    open_session,
)
from shared.jobs import PROVISION, PROVISION_QUEUE, TEARDOWN, TEARDOWN_QUEUE

log = structlog.get_logger(__name__)
blueprint = Blueprint("sessions", __name__)


@blueprint.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@blueprint.get("/readyz")
def readyz() -> tuple[Response, int]:
    try:
        runtime().redis.ping()
    except redis.RedisError as exc:
        return jsonify({"status": "unavailable", "redis": str(exc)}), 503
    return jsonify({"status": "ok"}), 200


@blueprint.get("/v1/templates")
def list_templates() -> Response:
    platform_caller()
    rt = runtime()
    settings = rt.settings
    return jsonify(
        {
            "templates": [
                {
                    "name": t.name,
                    "description": t.description,
                    "max_lifetime_seconds": t.max_lifetime_seconds,
                    "idle_timeout_seconds": settings.idle_timeout_seconds or t.idle_timeout_seconds,
                    "vms": [
                        {
                            "name": vm.name,
                            "hostname": vm.hostname,
                            "cpu_cores": vm.cpu_cores,
                            "memory": vm.memory,
                        }
                        for vm in t.vms
                    ],
                }
                for t in sorted(rt.templates.values(), key=lambda t: t.name)
            ],
            "regions": list(settings.regions),
            "default_region": settings.default_region,
        }
    )


@blueprint.post("/v1/sessions")
def create_session() -> tuple[Response, int, dict[str, str]]:
    platform_caller()
    rt = runtime()
    data = body(CreateSessionRequest, require_json=True)
    template = rt.templates.get(data["template"])
    if template is None:
        raise ApiError(
            422,
            "unknown_template",
            f"no template named {data['template']!r}",
            details={"templates": sorted(rt.templates)},
        )
    region = data["region"] or rt.settings.default_region
    if region not in rt.settings.regions:
        raise ApiError(
            422,
            "unknown_region",
            f"no cluster serves region {region!r}",
            details={"regions": list(rt.settings.regions)},
        )
    try:
        session, token = open_session(
            user=data["user"],
            template=template.name,
            region=region,
            max_lifetime_seconds=template.max_lifetime_seconds,
            idle_timeout_seconds=rt.settings.idle_timeout_seconds or template.idle_timeout_seconds,
            now=rt.clock(),
        )
    except InvalidUser as exc:
        raise invalid_request({"user": [str(exc)]}) from exc
    rt.sessions.add(session)
    structlog.contextvars.bind_contextvars(session_id=session.id, template=session.template)
    try:
        rt.celery.send_task(PROVISION, args=[session.id], queue=PROVISION_QUEUE)
    except Exception as exc:
        rt.sessions.update(
            session.id,
            lambda s: s.transition(
                SessionState.FAILED, at=rt.clock(), reason="could not queue provisioning"
            ),
        )
        log.exception("session.enqueue_failed")
        raise ApiError(
            503,
            "unavailable",
            "could not queue the environment; try again",
            headers={"Retry-After": "2"},
        ) from exc
    log.info("session.created", user=session.user, region=region)
    return (
        jsonify(session_body(session, token=token)),
        201,
        {"Location": f"/v1/sessions/{session.id}"},
    )


@blueprint.get("/v1/sessions/<session_id>")
def get_session(session_id: str) -> Response:
    return jsonify(session_body(session_for(session_id, caller())))


@blueprint.delete("/v1/sessions/<session_id>")
def delete_session(session_id: str) -> tuple[Response, int]:
    return _close(session_id, reason="deleted", allow_body_token=False)


@blueprint.post("/v1/sessions/<session_id>/close")
def close_session(session_id: str) -> tuple[Response, int]:
    return _close(session_id, reason="closed", allow_body_token=True)


@blueprint.post("/v1/sessions/<session_id>/heartbeat")
def heartbeat(session_id: str) -> Response:
    session = session_for(session_id, caller(allow_body_token=True))
    if session.state not in (SessionState.PROVISIONING, SessionState.READY):
        raise ApiError(409, "session_closed", f"the session is {session.state.value}")
    rt = runtime()
    now = rt.clock()

    def seen(current: Session) -> Session:
        if current.state not in (SessionState.PROVISIONING, SessionState.READY):
            raise IllegalTransition(current.state, current.state)
        return current.seen(now)

    try:
        session = rt.sessions.update(session.id, seen)
    except SessionNotFound as exc:
        raise session_not_found() from exc
    except IllegalTransition as exc:
        raise ApiError(409, "session_closed", f"the session is {exc.current.value}") from exc
    return jsonify(session_body(session))


def _close(session_id: str, *, reason: str, allow_body_token: bool) -> tuple[Response, int]:
    session = session_for(session_id, caller(allow_body_token=allow_body_token))
    rt = runtime()
    now = rt.clock()
    moved: list[bool] = []

    def change(current: Session) -> Session:
        moved.clear()
        if current.state not in (SessionState.PROVISIONING, SessionState.READY):
            return current
        moved.append(True)
        return current.transition(SessionState.TERMINATING, at=now, reason=reason)

    try:
        session = rt.sessions.update(session.id, change)
    except SessionNotFound as exc:  # a finished session's document expired meanwhile
        raise session_not_found() from exc
    if moved:
        rt.celery.send_task(TEARDOWN, args=[session.id], queue=TEARDOWN_QUEUE)
        log.info("session.closing", reason=reason)
    return jsonify(session_body(session)), 202
