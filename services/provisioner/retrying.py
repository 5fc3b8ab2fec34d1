"""How the provisioner's tasks treat a failure: retry what may pass, give up on the rest."""

from __future__ import annotations

import structlog
from celery import Task

log = structlog.get_logger(__name__)

MAX_RETRIES = 8
MAX_DELAY_SECONDS = 60


def retry_or_give_up(task: Task, exc: Exception, *, transient: bool, what: str) -> None:
    """Raise Celery's ``Retry`` (capped exponential backoff) while a transient failure has
    retries left; otherwise log that ``what`` gives up and return, for the caller to decide."""
    retries = task.request.retries
    if transient and retries < task.max_retries:
        log.warning(f"{what}.retry", error=str(exc), retries=retries)
        raise task.retry(exc=exc, countdown=float(min(MAX_DELAY_SECONDS, 2**retries))) from exc
    log.exception(f"{what}.gave_up")
