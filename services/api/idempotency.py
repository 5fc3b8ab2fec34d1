"""``Idempotency-Key`` on creates: a retried request gets the first one's answer, not a second
session.

A frontend that lost an answer (a timeout, a dropped connection) sends the same request with
the same key again and gets the same status, body (the session token included) and
``Location``, for ``LABVIRT_IDEMPOTENCY_TTL_SECONDS``. Keys are scoped per credential: two
frontends may use the same key. The same key with another body is a 422; a duplicate that
arrives while the first is still being handled waits for its answer, a few seconds at most,
then gets a 409 with ``Retry-After``. An answer that is an error is not kept, so a retry after
a 503 can still succeed. ``shared.adapters.idempotency`` keeps the records, sealed.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, ParamSpec

import redis
import structlog
from flask import Response, current_app, request
from flask.typing import ResponseReturnValue
from marshmallow import Schema

from services.api.context import body, platform_caller, runtime
from services.api.errors import ApiError
from shared.adapters.idempotency import (
    Claimed,
    Completed,
    IdempotencyScope,
    IdempotencyStore,
    InFlight,
    StoredResponse,
    body_fingerprint,
)

log = structlog.get_logger(__name__)

HEADER: Final = "Idempotency-Key"
HEADER_POINTER: Final = f"#/headers/{HEADER}"
# 1 to 255 printable ASCII characters.
_VALID_KEY: Final = re.compile(r"[\x20-\x7e]{1,255}")
# Where tests put an ``InFlightWait`` with a fake clock.
WAIT_EXTENSION: Final = "labvirt.idempotency_wait"

P = ParamSpec("P")


@dataclass(frozen=True)
class InFlightWait:
    """How long a duplicate waits for the first request's answer, polling with backoff."""

    seconds: float = 5.0
    first_pause: float = 0.02
    longest_pause: float = 0.25
    retry_after_seconds: int = 1
    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


def idempotent(
    schema: type[Schema],
) -> Callable[[Callable[P, ResponseReturnValue]], Callable[P, Response]]:
    """Honour ``Idempotency-Key`` on a view whose body ``schema`` validates; without the
    header the view runs as it is."""

    def decorate(view: Callable[P, ResponseReturnValue]) -> Callable[P, Response]:
        @functools.wraps(view)
        def run(*args: P.args, **kwargs: P.kwargs) -> Response:
            given = request.headers.get(HEADER)
            if given is None:
                return current_app.make_response(view(*args, **kwargs))
            who = platform_caller()  # an unknown caller gets a 401, and no scope
            key = _valid_key(given)
            data = body(schema, require_json=True)
            scope = IdempotencyScope.derive(credential=who.token, idempotency_key=key)
            store = IdempotencyStore(
                runtime().redis, ttl_seconds=runtime().settings.idempotency_ttl_seconds
            )
            outcome = _claim_or_wait(store, scope, body_fingerprint(data))
            if isinstance(outcome, Completed):
                log.info("idempotency.replayed", status=outcome.response.status)
                return _replay(outcome.response)
            return _answer_once(store, scope, outcome, lambda: view(*args, **kwargs))

        return run

    return decorate


def _valid_key(given: str) -> str:
    # WSGI joins repeated headers with ", ": two keys arrive as one, and are that one key.
    if not _VALID_KEY.fullmatch(given):
        raise ApiError(
            400,
            "invalid_request",
            f"the {HEADER} header is invalid",
            errors=[
                {
                    "pointer": HEADER_POINTER,
                    "detail": "expected 1 to 255 printable ASCII characters",
                }
            ],
        )
    return given


def _claim_or_wait(
    store: IdempotencyStore, scope: IdempotencyScope, fingerprint: str
) -> Claimed | Completed:
    """Take the key, or the answer it already has; while another request holds it, poll until
    it answers (or fails, and this request may take the key)."""
    wait: InFlightWait = current_app.extensions.get(WAIT_EXTENSION) or InFlightWait()
    deadline = wait.monotonic() + wait.seconds
    pause = wait.first_pause
    while True:
        outcome = store.claim(scope, fingerprint)
        if outcome.fingerprint != fingerprint:
            raise ApiError(
                422,
                "idempotency_key_reused",
                f"this {HEADER} was already used with another request body; "
                "send a new key with a new request",
            )
        if not isinstance(outcome, InFlight):
            return outcome
        remaining = deadline - wait.monotonic()
        if remaining <= 0:
            raise ApiError(
                409,
                "idempotency_key_in_flight",
                f"a request with this {HEADER} is still being handled; retry shortly",
                headers={"Retry-After": str(wait.retry_after_seconds)},
            )
        wait.sleep(min(pause, remaining))
        pause = min(pause * 2, wait.longest_pause)


def _answer_once(
    store: IdempotencyStore,
    scope: IdempotencyScope,
    claim: Claimed,
    view: Callable[[], ResponseReturnValue],
) -> Response:
    """Run the view holding the key; keep a success for replays, free the key otherwise."""
    try:
        response = current_app.make_response(view())
    except BaseException:
        store.release(scope, claim)
        raise
    if not 200 <= response.status_code < 300:
        store.release(scope, claim)
        return response
    kept = StoredResponse(
        status=response.status_code,
        body=response.get_data(as_text=True),
        content_type=response.content_type or "application/json",
        location=response.headers.get("Location"),
    )
    try:
        if not store.complete(scope, claim, kept):
            # The claim outlived its TTL and another request may have taken the key: this
            # answer stands, but it is not the one replays give.
            log.warning("idempotency.claim_lost")
    except redis.RedisError:
        # The session exists and this answer is the only copy of its token: give it, even if
        # a retry with this key cannot replay it.
        log.exception("idempotency.store_failed")
    return response


def _replay(stored: StoredResponse) -> Response:
    response = Response(stored.body, status=stored.status, content_type=stored.content_type)
    if stored.location is not None:
        response.headers["Location"] = stored.location
    return response
