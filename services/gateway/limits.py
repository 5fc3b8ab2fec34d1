"""The gateway's request rate limit: event streams and terminals opened per client address.

The same count (``labvirt:rate:client_ip:...`` in Redis) as the API's browser calls, so a
client's heartbeats, tickets, streams and terminals share one budget, whichever process
serves them. A refusal is a 429 problem (RFC 9457) with ``Retry-After``, before any upgrade.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import structlog
from aiohttp import web

from shared.adapters.rate_limits import AsyncRateLimiter, RateScope, Throttled
from shared.client_address import client_address
from shared.config_limits import Limits
from shared.problems import PROBLEM_MEDIA_TYPE, problem_body

log = structlog.get_logger(__name__)


async def limit_browser_call(
    request: web.Request,
    limiter: AsyncRateLimiter,
    limits: Limits,
    *,
    clock: Callable[[], float] = time.time,
) -> None:
    """Count this request for its client address; raises the 429 when it is one too many."""
    rate = limits.browser_per_ip
    if rate is None:
        return
    address = client_address(
        request.remote,
        ", ".join(request.headers.getall("X-Forwarded-For", [])),
        limits.trusted_proxies,
    )
    throttled = await limiter.check(RateScope.CLIENT_IP, address, rate, now=clock())
    if throttled is not None:
        log.warning("gateway.rate_limited", scope=throttled.scope.value, limit=str(rate))
        raise rate_limited(throttled)


def rate_limited(throttled: Throttled) -> web.HTTPTooManyRequests:
    body = problem_body(429, "rate_limited", throttled.message, context=throttled.details)
    return web.HTTPTooManyRequests(
        text=json.dumps(body),
        content_type=PROBLEM_MEDIA_TYPE,
        headers={"Cache-Control": "no-store", "Retry-After": str(throttled.retry_after)},
    )
