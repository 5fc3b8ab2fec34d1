"""labvirt's one retry layer: capped, jittered exponential backoff under a budget per task.

Only calls to a cluster are retried, and only here: the Kubernetes adapter runs every call
through ``Retry``, and nothing above it retries again (no Celery retries on top), so one outage
cannot multiply into a retry storm. Each task runs inside ``retry_budget(n)``: all the calls of
that task share ``n`` retries, so a task under faults costs at most its fault-free calls plus
``n``. Outside a task (the informer's list, a test) each call has only its own attempt limit.

A 429 waits at least its ``Retry-After`` (capped), which the server set for a reason.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Final, Protocol, TypeVar

import structlog

from shared.metrics.series import series

log = structlog.get_logger(__name__)

T = TypeVar("T")


class RetryableError(Protocol):
    """What the layer needs to know of a failure: may it pass, and did the server say when."""

    transient: bool
    retry_after: float | None


@dataclass(frozen=True)
class Backoff:
    """Full-jitter exponential backoff: attempt n waits uniform(0, min(cap, base * 2**n))."""

    base: float = 0.2
    cap: float = 5.0

    def delay(self, attempt: int, rng: random.Random, *, retry_after: float | None = None) -> float:
        wait = rng.uniform(0, min(self.cap, self.base * 2**attempt))
        if retry_after is not None:
            wait = max(wait, min(self.cap, retry_after))
        return wait


@dataclass
class RetryBudget:
    """How many retries the calls of one task may still spend between them."""

    limit: int
    spent: int = 0
    exhausted_by: list[str] = field(default_factory=list)

    def take(self, what: str) -> bool:
        if self.spent >= self.limit:
            self.exhausted_by.append(what)
            return False
        self.spent += 1
        return True


_budget: ContextVar[RetryBudget | None] = ContextVar("labvirt_retry_budget", default=None)

# Retries one task may spend on all its cluster calls, fault-free calls not counted.
DEFAULT_TASK_BUDGET: Final = 8


@contextmanager
def retry_budget(limit: int = DEFAULT_TASK_BUDGET) -> Iterator[RetryBudget]:
    """Run a task's calls under one shared budget of ``limit`` retries."""
    budget = RetryBudget(limit)
    token = _budget.set(budget)
    try:
        yield budget
    finally:
        _budget.reset(token)


class Retry:
    """Run an operation; retry its transient failures while the call and the budget allow."""

    def __init__(
        self,
        *,
        attempts: int = 6,
        backoff: Backoff | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.attempts = attempts
        self.backoff = backoff or Backoff()
        self._sleep = sleep
        self._rng = rng or random.Random()

    def __call__(self, operation: Callable[[], T], *, what: str, error: type[Exception]) -> T:
        """``operation()``; ``error`` is the exception type whose ``transient`` ones retry."""
        budget = _budget.get()
        for attempt in range(1, self.attempts + 1):
            try:
                return operation()
            except error as exc:
                transient = bool(getattr(exc, "transient", False))
                if not transient or attempt == self.attempts:
                    raise
                if budget is not None and not budget.take(what):
                    log.info("retry.budget_exhausted", what=what, limit=budget.limit)
                    raise
                delay = self.backoff.delay(
                    attempt, self._rng, retry_after=getattr(exc, "retry_after", None)
                )
                log.debug(
                    "retry.wait", what=what, attempt=attempt, delay=round(delay, 3), error=str(exc)
                )
                self._sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover


class CountedRetry:
    """A ``Retry`` whose every attempt is counted (``labvirt_kube_calls_total``): by region, by
    verb (the first word of ``what``: create, get, list, patch, delete) and by answer."""

    def __init__(self, retry: Retry, *, region: str) -> None:
        self.retry = retry
        self._region = region

    def __call__(self, operation: Callable[[], T], *, what: str, error: type[Exception]) -> T:
        calls = series().kube_calls
        verb = what.split(" ", 1)[0]

        def counted() -> T:
            try:
                result = operation()
            except error as exc:
                status = getattr(exc, "status", None)
                code = str(status) if status else "unreachable"  # no answer: 0 or None
                calls.labels(region=self._region, verb=verb, code=code).inc()
                raise
            calls.labels(region=self._region, verb=verb, code="2xx").inc()
            return result

        return self.retry(counted, what=what, error=error)
