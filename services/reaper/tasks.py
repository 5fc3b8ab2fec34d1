"""The reaper: ends sessions whose lifetime or idle deadline has passed.

Level-triggered and cheap: each tick reads only what expired (``ZRANGEBYSCORE ... LIMIT``) and
takes each expired session through a ``ZREM`` gate that exactly one reaper wins, so several
reapers never tear one session down twice.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import structlog
from celery import Task, shared_task

from shared.adapters.session_store import DEADLINE_KINDS, RedisSessionStore, SessionNotFound
from shared.domain.sessions import Session, SessionState
from shared.jobs import REAP, TEARDOWN, TEARDOWN_QUEUE
from shared.runtime import runtime_of

log = structlog.get_logger(__name__)

_REASONS = {"lifetime": "maximum lifetime reached", "idle": "idle timeout"}


def reap_expired(sessions: RedisSessionStore, *, now: float, batch: int) -> list[str]:
    """Move every expired live session to ``terminating``; return the ids this caller won."""
    won: list[str] = []
    for kind in DEADLINE_KINDS:
        for session_id in sessions.due(kind, now, batch):
            if not sessions.take_due(kind, session_id):
                continue  # another reaper got it
            reason = _REASONS[kind]
            moved: list[bool] = []

            def change(
                current: Session, reason: str = reason, kind: str = kind, moved: list[bool] = moved
            ) -> Session:
                moved.clear()
                if current.state not in (SessionState.PROVISIONING, SessionState.READY):
                    return current
                # The deadline may have moved (a heartbeat) since this tick read it.
                deadline = current.expires_at if kind == "lifetime" else current.idle_expires_at
                if deadline > now:
                    return replace(current)  # a fresh copy is written back: re-indexed
                moved.append(True)
                return current.transition(SessionState.TERMINATING, at=now, reason=reason)

            try:
                updated = sessions.update(session_id, change)
            except SessionNotFound:
                continue
            if moved:
                won.append(session_id)
                log.info(
                    "session.expired",
                    session_id=session_id,
                    template=updated.template,
                    reason=reason,
                )
    return won


@shared_task(bind=True, name=REAP, acks_late=True, ignore_result=True)
def reap(self: Task) -> dict[str, Any]:
    runtime = runtime_of(self.app)
    structlog.contextvars.bind_contextvars(task_id=self.request.id, task=self.name)
    expired = reap_expired(
        runtime.sessions, now=runtime.clock(), batch=runtime.settings.reaper_batch
    )
    for session_id in expired:
        runtime.celery.send_task(TEARDOWN, args=[session_id], queue=TEARDOWN_QUEUE)
    return {"expired": len(expired)}
