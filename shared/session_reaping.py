"""The reaper's side of a session's life: settling the deadlines that passed.

``SessionLife.reap`` calls ``reap_due``: it reads only what is due (``ZRANGEBYSCORE ...
LIMIT``) and settles each due session in one optimistic transaction (its new state, its
re-indexed deadlines and its progress event commit together, for exactly one reaper), then
queues the teardowns and the provisions asked again that this caller won. The rules themselves
are the domain's (``shared.domain.lifecycle.on_deadline``).
"""

from __future__ import annotations

import random

import structlog

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
from shared.jobs import PROVISION, TEARDOWN, TaskQueue
from shared.session_results import Reaped

log = structlog.get_logger(__name__)


def reap_due(
    store: RedisSessionStore,
    queue: TaskQueue,
    *,
    now: float,
    batch: int,
    rng: random.Random | None = None,
) -> Reaped:
    """Settle every due deadline (at most ``batch`` per kind); queue what this caller won.

    ``rng`` shuffles each batch, so reapers running at once start on different sessions
    instead of queueing behind each other on the same ones.
    """
    reaped = Reaped()
    for kind in DEADLINE_KINDS:
        due = store.due(kind, now, batch)
        if rng is not None:
            rng.shuffle(due)
        for session_id in due:
            outcome = settle_deadline(store, kind, session_id, now=now)
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
            elif outcome.effect is Effect.PROVISION:
                # Nothing created yet, long after the ask: its worker most likely died holding
                # the task, which would otherwise come back only after the visibility timeout.
                reaped.provisions.append(session_id)
                log.warning("session.provision_asked_again", session_id=session_id)
            else:
                reaped.warnings.append(session_id)
                log.info("session.expiring_soon", session_id=session_id, **outcome.detail)
    for closed in reaped.teardowns:
        queue.enqueue(TEARDOWN, {"session_id": closed})
    for lost in reaped.provisions:
        queue.enqueue(PROVISION, {"session_id": lost})
    return reaped


def settle_deadline(
    store: RedisSessionStore, kind: DeadlineKind, session_id: str, *, now: float
) -> DeadlineOutcome | None:
    """Apply one due deadline in one transaction; None if the session's document is gone.

    The outcome's effect is set only for the caller whose transaction committed the
    change: a second reaper re-reads the session, finds the deadline moved on and does
    nothing.
    """
    outcomes: list[DeadlineOutcome] = []

    def change(current: Session) -> Session:
        outcomes.clear()
        outcome = on_deadline(current, kind, now=now, policy=store.policy)
        outcomes.append(outcome)
        return outcome.session

    def announce(_before: Session, _after: Session) -> ProgressEvent | None:
        outcome = outcomes[-1]
        if outcome.effect is Effect.WARN:
            return ProgressEvent(Stage.EXPIRING_SOON, now, dict(outcome.detail))
        return None

    try:
        # reindex: even when nothing changes, the stale deadline entry is replaced.
        store.update(session_id, change, reindex=True, announce=announce)
    except SessionNotFound:
        store.forget_deadline(kind, session_id)
        return None
    return outcomes[-1]
