"""The API's metrics: ``GET /metrics``, and how each create ends (``counted_create``).

``/metrics`` answers an admin token or a scrape token (``shared.metrics.access``) with this
API's process group's series (its gunicorn workers' files merged) and what Redis knows
(``shared.metrics.state``): pools, dead letters, regions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Final

from flask import Blueprint, Response, request

from services.api.context import runtime
from services.api.errors import ApiError, forbidden, unauthorized
from services.api.openapi import Credential, RawContent, documented
from shared.metrics.access import scrape_refusal
from shared.metrics.exposition import render
from shared.metrics.series import series
from shared.metrics.state import state_collector

metrics = Blueprint("metrics", __name__)

CreateAnswer = tuple[Response, int, dict[str, str]]
UNKNOWN: Final = "unknown"
# Creates that could not be handled now (contention, a queue down): not the caller's doing.
_FAILURES: Final = frozenset({"user_busy", "unavailable"})
# Refusals of the credential itself: no session was asked for by a platform.
_UNAUTHENTICATED: Final = frozenset({401, 403})


@metrics.get("/metrics")
@documented(
    summary="Prometheus metrics (text exposition format)",
    answers={200: RawContent({"text/plain": {"type": "string"}})},
    security=(Credential.ADMIN, Credential.METRICS),
    uses_storage=False,
)
def scrape() -> Response:
    """Every `labvirt_*` series of this API and what Redis knows (pools, dead letters,
    regions); a Redis that does not answer shows as `labvirt_redis_up 0`, never as an error."""
    rt = runtime()
    refusal = scrape_refusal(request.headers.get("Authorization"), rt.settings)
    if refusal is not None and refusal.status == 403:
        raise forbidden(refusal.detail)
    if refusal is not None:
        raise unauthorized(refusal.detail)
    body, content_type = render([state_collector(rt)])
    return Response(body, content_type=content_type)


def counted_create(view: Callable[[], CreateAnswer]) -> Callable[[], CreateAnswer]:
    """Count each create by outcome: warm, cold, reconnected, rejected (a limit, a cap, a
    template or region refused: ``reason`` is the problem's code) or failed. Under
    ``idempotent``, so a replayed answer counts nothing."""

    @functools.wraps(view)
    def counting() -> CreateAnswer:
        try:
            answer = view()
        except ApiError as exc:
            if exc.status not in _UNAUTHENTICATED:
                outcome = "failed" if exc.code in _FAILURES else "rejected"
                _count(*_asked_where(exc.details), outcome=outcome, reason=exc.code)
            raise
        except Exception:
            _count(*_asked_where({}), outcome="failed", reason="error")
            raise
        opened: dict[str, Any] = answer[0].get_json()
        outcome = "cold"
        if opened.get("reconnected"):
            outcome = "reconnected"
        elif opened.get("warm"):
            outcome = "warm"
        _count(opened["template"], opened["region"], outcome=outcome)
        return answer

    return counting


def _count(template: str, region: str, *, outcome: str, reason: str = "") -> None:
    series().session_requests.labels(
        template=template, region=region, outcome=outcome, reason=reason
    ).inc()


def _asked_where(details: dict[str, Any]) -> tuple[str, str]:
    """The template and region a refused create named, as labels: only ones labvirt has (a
    caller's made-up names would grow the series without bound)."""
    rt = runtime()
    data = request.get_json(silent=True)
    asked = data if isinstance(data, dict) else {}
    template = asked.get("template")
    region = details.get("region") or asked.get("region")
    return (
        template if isinstance(template, str) and template in rt.templates else UNKNOWN,
        region if isinstance(region, str) and region in rt.settings.regions else UNKNOWN,
    )
