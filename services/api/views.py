"""Session, template and health endpoints: validate, call one domain function, enqueue, answer."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import redis
import structlog
from flask import Blueprint, Response, jsonify

from services.api.context import body, caller, platform_caller, runtime, session_for
from services.api.errors import ApiError, invalid_request, session_not_found
from services.api.schemas import CreateSessionRequest, TokenBody, session_body
from services.api.warm import claim_warm_environment, first_task
from shared.adapters.session_store import SessionNotFound, UserBusy
from shared.domain.lifecycle import (
    Decision,
    ExtensionRefused,
    admit,
    clocks_for,
    extend,
    start_session,
)
from shared.domain.sessions import (
    IllegalTransition,
    InvalidUser,
    Session,
    SessionState,
    check_user,
)
from shared.domain.templates import Template
from shared.jobs import PROVISION_QUEUE, TEARDOWN, TEARDOWN_QUEUE
from shared.runtime import Runtime, clock_overrides

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
    overrides = clock_overrides(settings)
    return jsonify(
        {
            "templates": [
                {
                    "name": t.name,
                    "description": t.description,
                    "max_lifetime_seconds": clocks_for(t, overrides).max_lifetime_seconds,
                    "idle_timeout_seconds": clocks_for(t, overrides).idle_timeout_seconds,
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
        user = check_user(data["user"])
    except InvalidUser as exc:
        raise invalid_request({"user": [str(exc)]}) from exc
    # One create at a time per user, from the rule's read to the store: two concurrent creates
    # (a double click, two tabs) cannot both find "no session" and both make one.
    with _user_lock(rt, user):
        existing = _existing_session_rule(rt, data, user=user, template=template, region=region)
        if existing is not None:
            # A reconnect (a page reload): the session as it is, without a token, which only
            # the first answer carried (labvirt keeps its hash, not the token).
            return (
                jsonify({**session_body(existing), "reconnected": True}),
                200,
                {"Location": f"/v1/sessions/{existing.id}"},
            )
        session, token = start_session(
            user=user,
            template=template.name,
            region=region,
            clocks=clocks_for(template, clock_overrides(rt.settings)),
            now=rt.clock(),
        )
        session = claim_warm_environment(rt, session)  # a hit is ready now; a miss goes cold
        rt.sessions.add(session)
        structlog.contextvars.bind_contextvars(session_id=session.id, template=session.template)
        try:
            rt.celery.send_task(first_task(session), args=[session.id], queue=PROVISION_QUEUE)
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


@contextmanager
def _user_lock(rt: Runtime, user: str) -> Iterator[None]:
    with ExitStack() as stack:
        try:
            stack.enter_context(rt.sessions.user_lock(user))
        except UserBusy as exc:
            raise ApiError(
                503,
                "user_busy",
                "another request for this user is still being handled; try again",
                headers={"Retry-After": "1"},
            ) from exc
        yield


def _existing_session_rule(
    rt: Runtime, data: dict[str, Any], *, user: str, template: Template, region: str
) -> Session | None:
    """Apply "one active session per user": the session to reconnect to, or None to create.

    Raises 409 when the user is at the limit with other templates; with ``"replace": true``
    closes the user's live sessions first.
    """
    admission = admit(
        rt.sessions.user_sessions(user),
        template=template.name,
        region=region,
        max_sessions=rt.settings.max_sessions_per_user,
        replace_existing=data["replace"],
    )
    if admission.decision is Decision.RECONNECT:
        log.info(
            "session.reconnected", session_id=admission.session.id if admission.session else None
        )
        return admission.session
    if admission.decision is Decision.REFUSE:
        others = ", ".join(f"{s.id} ({s.template})" for s in admission.conflicting)
        raise ApiError(
            409,
            "session_limit",
            f"user {user!r} already has {len(admission.conflicting)} active session(s): "
            f'{others}; close it or send "replace": true to close it and start {template.name!r}',
            details={
                "max_sessions_per_user": rt.settings.max_sessions_per_user,
                "sessions": [
                    {"id": s.id, "template": s.template, "region": s.region, "state": s.state.value}
                    for s in admission.conflicting
                ],
            },
        )
    for old in admission.to_close:
        try:
            _terminate(rt, old.id, reason="replaced")
        except SessionNotFound:
            continue  # gone meanwhile: nothing to close
    return None


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


@blueprint.post("/v1/sessions/<session_id>/extend")
def extend_session(session_id: str) -> Response:
    """Move the end by the template's step, up to its hard deadline; 409 past it."""
    session = session_for(session_id, caller(allow_body_token=True))
    body(TokenBody)  # nothing but an optional token is accepted
    rt = runtime()
    now = rt.clock()
    try:
        session = rt.sessions.update(session.id, lambda current: extend(current, now=now))
    except SessionNotFound as exc:
        raise session_not_found() from exc
    except ExtensionRefused as exc:
        raise ApiError(409, exc.code, exc.message, details=_deadlines(session)) from exc
    log.info("session.extended", expires_at=session.expires_at)
    return jsonify(session_body(session))


def _deadlines(session: Session) -> dict[str, Any]:
    extra = session_body(session)
    return {key: extra[key] for key in ("state", "expires_at", "hard_expires_at")}


def _close(session_id: str, *, reason: str, allow_body_token: bool) -> tuple[Response, int]:
    session = session_for(session_id, caller(allow_body_token=allow_body_token))
    try:
        session = _terminate(runtime(), session.id, reason=reason)
    except SessionNotFound as exc:  # a finished session's document expired meanwhile
        raise session_not_found() from exc
    return jsonify(session_body(session)), 202


def _terminate(rt: Runtime, session_id: str, *, reason: str) -> Session:
    """Move a live session to ``terminating`` and queue its teardown (once, however often)."""
    now = rt.clock()
    moved: list[bool] = []

    def change(current: Session) -> Session:
        moved.clear()
        if current.state not in (SessionState.PROVISIONING, SessionState.READY):
            return current
        moved.append(True)
        return current.transition(SessionState.TERMINATING, at=now, reason=reason)

    session = rt.sessions.update(session_id, change)
    if moved:
        rt.celery.send_task(TEARDOWN, args=[session.id], queue=TEARDOWN_QUEUE)
        log.info("session.closing", session_id=session.id, reason=reason)
    return session
