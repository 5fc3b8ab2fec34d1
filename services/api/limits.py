"""The API's request rate limits (``settings.limits``), counted in Redis across processes.

Creates are limited per learner (the body's ``user``) and per frontend token, once the body
is valid; admin tokens are not limited as frontend tokens, but their creates still count for
the learner. Browser calls (heartbeat, close, extend, tickets) are limited per client address,
in the same count as the gateway's event streams and terminals, before anything else is done
with the request; so are sign-ins on the operators' dashboard, in a count of their own. A
refusal is a 429 problem with ``Retry-After``.
"""

from __future__ import annotations

from typing import Final, NoReturn

import structlog
from flask import Flask, request

from services.api.auth import Role
from services.api.context import caller, runtime
from services.api.errors import ApiError
from shared.adapters.rate_limits import CountAlong, RateCheck, RateLimited, RateScope, Throttled
from shared.client_address import client_address
from shared.config_limits import Rate

log = structlog.get_logger(__name__)

# The views a learner's browser calls, by endpoint.
BROWSER_ENDPOINTS: Final = frozenset(
    {
        "sessions.heartbeat",
        "sessions.close_session",
        "sessions.extend_session",
        "sessions.create_ticket",
    }
)


def install_limits(app: Flask) -> None:
    """Limit the browser routes; call once every blueprint is registered."""
    missing = BROWSER_ENDPOINTS - app.view_functions.keys()
    if missing:
        # A renamed view would otherwise lose its limit without a word.
        raise RuntimeError(f"rate-limited endpoints not found: {sorted(missing)}")
    app.before_request(limit_browser_call)


def limit_browser_call() -> None:
    if request.endpoint not in BROWSER_ENDPOINTS:
        return
    settings = runtime().settings
    _enforce(RateScope.CLIENT_IP, _client_address(), settings.limits.browser_per_ip)


def limit_sign_in() -> None:
    """Count a sign-in attempt on the operators' dashboard for the client's address (its view
    calls this first, and shows a refusal on its form)."""
    _enforce(RateScope.SIGN_IN_IP, _client_address(), runtime().settings.limits.sign_ins_per_ip)


def _client_address() -> str:
    return client_address(
        request.remote_addr,
        ", ".join(request.headers.getlist("X-Forwarded-For")),
        runtime().settings.limits.trusted_proxies,
    )


def create_counting(user: str) -> CountAlong | None:
    """How a create for ``user`` (validated) and the frontend token that asks are counted:
    ``SessionLife.open`` sends it in the round trip that takes the user's lock, and raises
    ``RateLimited`` for a refusal (``refuse_rate_limited``). The learner first: a learner over
    their limit spends nothing of the frontend's budget."""
    rt = runtime()
    limits = rt.settings.limits
    checks = []
    if limits.creates_per_user is not None:
        checks.append(RateCheck(RateScope.USER, user, limits.creates_per_user))
    who = caller()
    if who.role is Role.FRONTEND and limits.creates_per_frontend_token is not None:
        checks.append(
            RateCheck(RateScope.FRONTEND_TOKEN, who.token, limits.creates_per_frontend_token)
        )
    if not checks or rt.rate_limiter is None:
        return None
    return rt.rate_limiter.counting_along(checks, now=rt.clock())


def refuse_rate_limited(refused: RateLimited) -> NoReturn:
    _refuse(refused.throttled)


def _enforce(scope: RateScope, subject: str, rate: Rate | None) -> None:
    rt = runtime()
    if rate is None or rt.rate_limiter is None:
        return
    throttled = rt.rate_limiter.check(scope, subject, rate, now=rt.clock())
    if throttled is not None:
        _refuse(throttled)


def _refuse(throttled: Throttled) -> NoReturn:
    log.warning("api.rate_limited", scope=throttled.scope.value, limit=str(throttled.rate))
    raise ApiError(
        429,
        "rate_limited",
        throttled.message,
        details=throttled.details,
        headers={"Retry-After": str(throttled.retry_after)},
    )
