"""The operators' dashboard at ``/ui/ops``: warm pools, live sessions, failures, time to ready.

A page for people, rendered here (Jinja templates and a small stylesheet under ``ops_ui/``;
a few lines of script refresh it, nothing else needs one). The ingress sends ``/ui/ops`` to the
API, not to the gateway that serves the rest of ``/ui``; under ``labvirt dev`` the gateway
forwards it.

Signing in: the form posts an admin token, checked as the API checks one, then dropped: the
browser gets a random id in a cookie (HttpOnly, SameSite=Strict, Secure over https and in
production) and Redis keeps the record (``shared.adapters.operator_sessions``), for eight hours
at most, or until sign-out or the token's removal from the configuration. Bearer tokens open
nothing here. Every form that changes something carries the record's CSRF token. Actions go
through the admin API's own functions (``change_pool``, ``requeue_failure``), so its rules hold
(validation, the pool budget, a requeue queued once); a refusal shows on the page with the
error's status, a success redirects back to the page (a reload repeats nothing).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog
from flask import Blueprint, Response, render_template, request, send_file
from marshmallow import ValidationError

from services.api.admin import (
    PoolUpdate,
    change_pool,
    pool_region,
    pool_store,
    require_template,
)
from services.api.admin_failed import operator_name, requested_by, requeue_failure
from services.api.auth import Role, identify
from services.api.context import runtime
from services.api.errors import ApiError, invalid_request
from services.api.limits import limit_sign_in
from services.api.openapi import browser_page
from services.api.ops_overview import overview
from shared.adapters.operator_sessions import Notice, OperatorSession, OperatorSessions
from shared.config import Mode
from shared.domain.pools.config import PoolKey

log = structlog.get_logger(__name__)

ops_ui = Blueprint("ops_ui", __name__, template_folder="ops_ui/templates")

PAGE: Final = "/ui/ops"
COOKIE: Final = "labvirt_ops"
REFRESH_SECONDS: Final = 10
ASSET_DIR: Final = Path(__file__).resolve().parent / "ops_ui" / "static"
ASSETS: Final = {"ops.css": "text/css", "ops.js": "text/javascript"}
_WHOLE_NUMBER: Final = re.compile(r"[0-9]{1,6}")
_SWITCH: Final = {"true": True, "false": False}
SECURITY_HEADERS: Final = {
    # Scripts and styles from this origin's files only: no inline code runs, whatever a
    # template would ever echo.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


@dataclass(frozen=True)
class SignedIn:
    id: str  # the cookie's value
    record: OperatorSession

    @property
    def requester(self) -> str:
        return requested_by(self.record.token_digest, self.record.operator)


@ops_ui.after_request
def protect(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


@ops_ui.get(PAGE)
@browser_page
def dashboard() -> Response:
    who = _signed_in()
    if who is None:
        return _sign_in_page()
    return _dashboard_page(who, notice=_sign_ins().take_notice(who.id))


@ops_ui.post(f"{PAGE}/sign-in")
@browser_page
def sign_in() -> Response:
    try:
        limit_sign_in()
    except ApiError as exc:
        return _sign_in_page(_explain(exc), status=exc.status, headers=exc.headers)
    token = request.form.get("token", "").strip()
    if not token:
        return _sign_in_page("Enter an admin token.", status=400)
    settings = runtime().settings
    caller = identify(token, frontend=settings.frontend_tokens, admin=settings.admin_tokens)
    if caller.role is not Role.ADMIN:
        log.warning("ops_ui.sign_in_refused")
        return _sign_in_page("That is not an admin token.", status=401)
    sign_ins = _sign_ins()
    previous = request.cookies.get(COOKIE)
    if previous:
        sign_ins.close(previous)
    session_id, record = sign_ins.open(
        admin_token=token,
        operator=operator_name(request.form.get("operator", "")),
        now=runtime().clock(),
    )
    log.info("ops_ui.signed_in", admin=record.token_digest[:8], operator=record.operator)
    response = _back_to_page()
    response.set_cookie(
        COOKIE,
        session_id,
        max_age=sign_ins.lifetime_seconds,
        path=PAGE,
        secure=_secure(),
        httponly=True,
        samesite="Strict",
    )
    return response


@ops_ui.post(f"{PAGE}/sign-out")
@browser_page
def sign_out() -> Response:
    who = _signed_in()
    if who is not None:
        if not who.record.csrf_matches(request.form.get("csrf", "")):
            return _stale_form(who)
        _sign_ins().close(who.id)
        log.info("ops_ui.signed_out", admin=who.record.token_digest[:8])
    response = _back_to_page()
    response.delete_cookie(COOKIE, path=PAGE, secure=_secure(), httponly=True, samesite="Strict")
    return response


@ops_ui.post(f"{PAGE}/pools")
@browser_page
def pause_every_pool() -> Response:
    def act(_who: SignedIn) -> str:
        paused = _switch("paused")
        pool_store(runtime()).set_globally_paused(paused)
        return "Every pool is paused." if paused else "Every pool is running again."

    return _act("pools.pause_all", act)


@ops_ui.post(f"{PAGE}/pools/<template>/size")
@browser_page
def resize_pool(template: str) -> Response:
    def act(_who: SignedIn) -> str:
        text = request.form.get("size", "").strip()
        if not _WHOLE_NUMBER.fullmatch(text):
            raise invalid_request({"size": ["a whole number"]}, "The size must be a whole number.")
        key = _change_pool(template, {"size": int(text)})
        return f"The {template} pool of {key.region} now aims at {int(text)} ready."

    return _act("pools.resize", act)


@ops_ui.post(f"{PAGE}/pools/<template>/paused")
@browser_page
def pause_pool(template: str) -> Response:
    def act(_who: SignedIn) -> str:
        paused = _switch("paused")
        key = _change_pool(template, {"paused": paused})
        state = "paused" if paused else "running again"
        return f"The {template} pool of {key.region} is {state}."

    return _act("pools.pause", act)


@ops_ui.post(f"{PAGE}/failed/<failure:failure_id>/requeue")
@browser_page
def requeue(failure_id: str) -> Response:
    def act(who: SignedIn) -> str:
        letter, queued = requeue_failure(failure_id, by=who.requester)
        if not queued:
            return f"{letter.task} ({letter.id}) is already requeued: not queued again."
        return f"{letter.task} ({letter.id}) is queued again."

    return _act("failed.requeue", act)


@ops_ui.get(f"{PAGE}/static/<asset>")
@browser_page
def static_asset(asset: str) -> Response:
    media = ASSETS.get(asset)
    if media is None:
        raise ApiError(404, "not_found", f"the dashboard has no file {asset!r}")
    return send_file(ASSET_DIR / asset, mimetype=media, max_age=300)


def _act(action: str, perform: Callable[[SignedIn], str]) -> Response:
    """Run a form's action for a signed-in operator whose form carries the CSRF token; a
    refusal of the admin API's rules is shown on the page with its status."""
    who = _signed_in()
    if who is None:
        return _sign_in_page("Sign in to do that (signing in again after eight hours).", status=401)
    if not who.record.csrf_matches(request.form.get("csrf", "")):
        return _stale_form(who)
    try:
        done = perform(who)
    except ApiError as exc:
        log.info("ops_ui.refused", action=action, code=exc.code, admin=who.record.token_digest[:8])
        return _dashboard_page(who, notice=Notice(_explain(exc), error=True), status=exc.status)
    log.info("ops_ui.action", action=action, admin=who.record.token_digest[:8], done=done)
    _sign_ins().leave_notice(who.id, Notice(done, error=False))
    return _back_to_page()


def _change_pool(template: str, raw: dict[str, Any]) -> PoolKey:
    rt = runtime()
    store = pool_store(rt)
    require_template(rt, template)
    try:
        change = PoolUpdate().load(raw)
    except ValidationError as exc:
        raise invalid_request(exc.messages, "The change is invalid.") from exc
    key = PoolKey(pool_region(rt, request.form.get("region") or None), template)
    change_pool(rt, store, key, change)
    return key


def _switch(name: str) -> bool:
    value = _SWITCH.get(request.form.get(name, ""))
    if value is None:
        raise invalid_request({name: ["true or false"]}, f"{name} must be true or false.")
    return value


def _explain(exc: ApiError) -> str:
    """An error of the admin API as a sentence for the page: what, then each field's why."""
    fields = [
        f"{problem['pointer'].lstrip('/#') or 'body'}: {problem['detail']}"
        for problem in exc.errors or []
    ]
    message = exc.message[:1].upper() + exc.message[1:]
    return " ".join([message.rstrip(".") + ".", *(f"{field}." for field in fields)])


def _signed_in() -> SignedIn | None:
    cookie = request.cookies.get(COOKIE, "")
    if not cookie:
        return None
    sign_ins = _sign_ins()
    record = sign_ins.get(cookie)
    if record is None:
        return None
    if not record.token_still_configured(runtime().settings.admin_tokens):
        sign_ins.close(cookie)  # the token was withdrawn: so is every sign-in made with it
        return None
    return SignedIn(cookie, record)


def _back_to_page() -> Response:
    """303 to the page: what the browser shows after an action, and a reload repeats nothing."""
    return Response(status=303, headers={"Location": PAGE})


def _sign_ins() -> OperatorSessions:
    return OperatorSessions(runtime().redis)


def _secure() -> bool:
    return request.is_secure or runtime().settings.mode is Mode.PRODUCTION


def _stale_form(who: SignedIn) -> Response:
    log.warning("ops_ui.csrf_refused", admin=who.record.token_digest[:8], path=request.path)
    notice = Notice("That form was not this page's own (or is stale): nothing changed.", True)
    return _dashboard_page(who, notice=notice, status=403)


def _sign_in_page(
    message: str = "", *, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    page = render_template("ops/sign_in.html", page=PAGE, message=message)
    return Response(page, status=status, mimetype="text/html", headers=headers)


def _dashboard_page(who: SignedIn, *, notice: Notice | None, status: int = 200) -> Response:
    page = render_template(
        "ops/dashboard.html",
        page=PAGE,
        view=overview(runtime()),
        notice=notice,
        csrf=who.record.csrf_token,
        signed_in_as=who.requester,
        refresh_seconds=REFRESH_SECONDS,
    )
    return Response(page, status=status, mimetype="text/html")
