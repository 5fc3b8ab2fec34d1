"""The reaper and the reconciler, as Celery tasks run by beat.

The reaper ends sessions whose deadlines passed, fails those that did not start in time, warns
those about to end and asks again for teardowns that went missing. Each tick reads only what is
due (``ZRANGEBYSCORE ... LIMIT``) and settles each due session in one optimistic transaction:
the session's new state, its re-indexed deadlines (the ``ZREM`` of the one that fired) and its
progress event commit together, for exactly one reaper. A reaper that dies before committing
leaves the deadline in place for the next tick; one that dies after committing but before
enqueueing the teardown is covered by the ``teardown`` deadline, which asks again later.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import structlog
from celery import Task, shared_task

from services.reaper.reconcile import Reconciler
from shared.adapters.kube import KubeError
from shared.adapters.session_store import RedisSessionStore, SessionNotFound
from shared.domain.lifecycle import (
    DEADLINE_KINDS,
    DeadlineKind,
    DeadlineOutcome,
    Effect,
    ProgressEvent,
    Stage,
    on_deadline,
)
from shared.domain.sessions import Session
from shared.jobs import PROVISION, PROVISION_QUEUE, REAP, RECONCILE, TEARDOWN, TEARDOWN_QUEUE
from shared.runtime import runtime_of
from shared.worker_runtime import worker_runtime_of

log = structlog.get_logger(__name__)


@dataclass
class Reaped:
    """What one tick settled: sessions to tear down, and sessions warned of their end."""

    teardowns: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def reap_expired(
    sessions: RedisSessionStore,
    *,
    now: float,
    batch: int,
    rng: random.Random | None = None,
) -> Reaped:
    """Settle every due deadline (at most ``batch`` per kind); report what this caller won.

    ``rng`` shuffles each batch, so reapers running at once start on different sessions
    instead of queueing behind each other on the same ones.
    """
    reaped = Reaped()
    for kind in DEADLINE_KINDS:
        due = sessions.due(kind, now, batch)
        if rng is not None:
            rng.shuffle(due)
        for session_id in due:
            outcome = settle(sessions, kind, session_id, now=now)
            if outcome is None or outcome.effect is None:
                continue
            if outcome.effect is Effect.TEARDOWN:
                reaped.teardowns.append(session_id)
                log.info(
                    "session.reaped",
                    session_id=session_id,
                    template=outcome.session.template,
                    deadline=kind.value,
                    state=outcome.session.state.value,
                    **outcome.detail,
                )
            elif outcome.effect is Effect.WARN:
                reaped.warnings.append(session_id)
                log.info("session.expiring_soon", session_id=session_id, **outcome.detail)
    return reaped


def settle(
    sessions: RedisSessionStore, kind: DeadlineKind, session_id: str, *, now: float
) -> DeadlineOutcome | None:
    """Apply one due deadline in one transaction; None if the session's document is gone.

    The outcome's effect is set only for the caller whose transaction committed the change: a
    second reaper re-reads the session, finds the deadline moved on and does nothing.
    """
    outcomes: list[DeadlineOutcome] = []

    def change(current: Session) -> Session:
        outcomes.clear()
        outcome = on_deadline(current, kind, now=now, policy=sessions.policy)
        outcomes.append(outcome)
        return outcome.session

    def announce(_before: Session, _after: Session) -> ProgressEvent | None:
        outcome = outcomes[-1]
        if outcome.effect is Effect.WARN:
            return ProgressEvent(Stage.EXPIRING_SOON, now, dict(outcome.detail))
        return None

    try:
        # reindex: even when nothing changes, the stale deadline entry is replaced.
        sessions.update(session_id, change, reindex=True, announce=announce)
    except SessionNotFound:
        sessions.forget_deadline(kind, session_id)
        return None
    return outcomes[-1]


@shared_task(bind=True, name=REAP, acks_late=True, ignore_result=True)
def reap(self: Task) -> dict[str, Any]:
    runtime = runtime_of(self.app)
    structlog.contextvars.bind_contextvars(task_id=self.request.id, task=self.name)
    reaped = reap_expired(
        runtime.sessions,
        now=runtime.clock(),
        batch=runtime.settings.reaper_batch,
        rng=random.Random(),
    )
    for session_id in reaped.teardowns:
        runtime.celery.send_task(TEARDOWN, args=[session_id], queue=TEARDOWN_QUEUE)
    return {"teardowns": len(reaped.teardowns), "warnings": len(reaped.warnings)}


@shared_task(bind=True, name=RECONCILE, acks_late=True, ignore_result=True)
def reconcile(self: Task) -> dict[str, Any]:
    runtime = worker_runtime_of(self.app)
    structlog.contextvars.bind_contextvars(task_id=self.request.id, task=self.name)
    reconciler = Reconciler(
        sessions=runtime.sessions,
        templates=runtime.templates,
        cluster_for=runtime.clusters.get,
        pools=runtime.pools,
        orphan_grace_seconds=runtime.settings.orphan_grace_seconds,
    )
    totals: dict[str, int] = {}
    for region in runtime.settings.regions:
        try:
            report = reconciler.reconcile(region, now=runtime.clock())
        except KubeError as exc:  # one unreachable cluster must not hold up the others
            log.warning("reconcile.region_failed", region=region, error=str(exc))
            totals["regions_failed"] = totals.get("regions_failed", 0) + 1
            continue
        for session_id in report.teardowns:
            runtime.celery.send_task(TEARDOWN, args=[session_id], queue=TEARDOWN_QUEUE)
        for session_id in report.provisions:
            runtime.celery.send_task(PROVISION, args=[session_id], queue=PROVISION_QUEUE)
        for key, value in report.counts().items():
            totals[key] = totals.get(key, 0) + value
    return totals
