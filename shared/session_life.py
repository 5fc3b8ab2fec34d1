"""Where a session's life is decided: the one application service every process calls.

The API opens, closes, heartbeats and extends sessions through it; the provisioner marks them
ready, failed or finished; the reaper settles their deadlines; the reconciler fails and restores
them. Each operation is a named domain operation (``shared.domain.sessions``: ``mark_ready``,
``fail`` with a typed ``Failure``, ``close`` with a ``CloseReason``, ``finish``...) applied in one
optimistic Redis transaction with its progress event, followed by the work it implies (a
closed or failed session's teardown is enqueued here, once, by whoever moved it). No service
chooses a state or writes a reason string of its own.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import structlog

from shared.adapters.connections import ConnectionSweeper
from shared.adapters.pool_store import RedisPoolStore
from shared.adapters.session_events import SessionEvents
from shared.adapters.session_store import RedisSessionStore, SessionNotFound, UserBusy
from shared.domain.lifecycle import (
    DEADLINE_KINDS,
    DeadlineKind,
    DeadlineOutcome,
    Decision,
    Effect,
    ProgressEvent,
    SessionClocks,
    Stage,
    admit,
    booting_progress,
    extend,
    on_deadline,
    start_session,
)
from shared.domain.reasons import CloseReason, Failure
from shared.domain.regions import RegionChoice, RegionHint
from shared.domain.sessions import (
    IllegalTransition,
    NotLive,
    Session,
    SessionState,
    VmView,
)
from shared.jobs import BIND_ENVIRONMENT, PROVISION, TEARDOWN, TaskQueue
from shared.regions import RegionPicker
from shared.session_results import NotQueued, Opened, Reaped, SessionLimitReached
from shared.warm_claim import claim_warm_environment

log = structlog.get_logger(__name__)

__all__ = [
    "NotQueued",
    "Opened",
    "Reaped",
    "SessionLife",
    "SessionLimitReached",
    "SessionNotFound",
    "UserBusy",
]


class SessionLife:
    def __init__(
        self,
        *,
        store: RedisSessionStore,
        events: SessionEvents,
        queue: TaskQueue,
        clock: Callable[[], float] = time.time,
        pools: RedisPoolStore | None = None,
        connections: ConnectionSweeper | None = None,
        max_sessions_per_user: int = 1,
        regions: RegionPicker | None = None,
    ) -> None:
        self.store = store
        self._events = events
        self._queue = queue
        self._clock = clock
        self._pools = pools
        self._connections = connections
        self._max_sessions_per_user = max_sessions_per_user
        self._regions = regions

    def get(self, session_id: str) -> Session | None:
        return self.store.get(session_id)

    # -- opening ----------------------------------------------------------------------------

    def open(
        self,
        *,
        user: str,
        template: str,
        clocks: SessionClocks,
        replace: bool,
        region: str | None = None,
        hint: RegionHint | None = None,
    ) -> Opened:
        """One active session per user: reconnect, refuse, or open (closing replaced ones).

        Creates for one user are serialised by a Redis lock (``UserBusy`` when it is held
        too long), so a double click cannot open two sessions.

        The region is decided here and nowhere else: ``region`` names one (shorthand for
        ``RegionHint(region=...)``), ``hint`` may instead give a location or a country, or
        nothing. A reconnect keeps the user's session where it is; otherwise the region picker
        (``shared.regions``) chooses before anything is closed or stored, and raises
        ``UnknownRegion`` or ``NoRegion`` (full, down, drained) when no region can take it.
        """
        if region is not None:
            hint = RegionHint(region=region)
        hint = hint or RegionHint()
        with self.store.user_lock(user):
            admission = admit(
                self.store.user_sessions(user),
                template=template,
                region=hint.region,
                max_sessions=self._max_sessions_per_user,
                replace_existing=replace,
            )
            if admission.decision is Decision.RECONNECT and admission.session is not None:
                log.info("session.reconnected", session_id=admission.session.id)
                reason = f"reconnected to the user's session in {admission.session.region}"
                return Opened(admission.session, None, reconnected=True, region_reason=reason)
            if admission.decision is Decision.REFUSE:
                raise SessionLimitReached(user, admission.conflicting, self._max_sessions_per_user)
            choice = self._choose_region(hint, template)
            region = choice.region
            for old in admission.to_close:
                try:
                    self.close(old.id, CloseReason.REPLACED)
                except SessionNotFound:
                    continue  # gone meanwhile: nothing to close
            session, token = start_session(
                user=user, template=template, region=region, clocks=clocks, now=self._clock()
            )
            session = self._claim_warm_environment(session)
            self.store.add(session)
            structlog.contextvars.bind_contextvars(session_id=session.id, template=template)
            first = BIND_ENVIRONMENT if session.warm else PROVISION
            try:
                self._queue.enqueue(first, {"session_id": session.id})
            except Exception as exc:
                # Nothing was created yet: fail without a teardown. A claimed warm environment
                # goes back through the prewarmer's sweep of unbound claims.
                self._move(session.id, lambda s: s.fail(Failure.not_queued(), at=self._clock()))
                log.exception("session.enqueue_failed")
                raise NotQueued(str(exc)) from exc
        log.info(
            "session.created",
            user=user,
            region=region,
            region_reason=choice.reason,
            warm=session.warm,
        )
        return Opened(session, token, region_reason=choice.reason)

    def _choose_region(self, hint: RegionHint, template: str) -> RegionChoice:
        if self._regions is not None:
            return self._regions.choose(hint, template=template)
        if hint.region is None:  # a SessionLife built without regions (tests, benchmarks)
            raise ValueError("this SessionLife has no region picker: name the region")
        return RegionChoice(hint.region, "requested")

    def _claim_warm_environment(self, session: Session) -> Session:
        if self._pools is None:
            return session
        return claim_warm_environment(self._pools, session, now=self._clock())

    # -- while it boots and serves ------------------------------------------------------------

    def record_progress(self, session_id: str, vms: list[VmView]) -> None:
        """A provisioning session's VMs as they boot, with a ``booting`` event when the count
        of ready ones changes (in the same transaction, so two observers send it once)."""
        now = self._clock()

        def change(current: Session) -> Session:
            if current.state is not SessionState.PROVISIONING or list(current.vms) == vms:
                return current
            return current.with_vms(vms)

        def announce(before: Session, after: Session) -> ProgressEvent | None:
            return booting_progress(before, after, at=now) if after is not before else None

        try:
            self.store.update(session_id, change, announce=announce)
        except SessionNotFound:
            return

    def refresh_vms(self, session_id: str, vms: list[VmView]) -> None:
        """A ready session's VM views (addresses, phases) as the cluster shows them now."""

        def change(current: Session) -> Session:
            if current.state is not SessionState.READY or list(current.vms) == vms:
                return current
            return current.with_vms(vms)

        try:
            self.store.update(session_id, change)
        except SessionNotFound:
            return

    def mark_ready(self, session_id: str, vms: list[VmView]) -> bool:
        """Every VM is up: True if this call made the session ready."""
        now = self._clock()
        session, moved = self._move(
            session_id,
            lambda s: s.mark_ready(vms=vms, at=now),
            announce=lambda before, after: booting_progress(before, after, at=now),
        )
        if moved and session is not None:
            log.info(
                "session.ready",
                session_id=session_id,
                template=session.template,
                seconds=round(now - session.created_at, 2),
            )
        return moved

    def emit(self, session_id: str, stage: Stage, detail: dict[str, Any]) -> None:
        """A progress event that changes nothing else (``creating``)."""
        self._events.emit(session_id, ProgressEvent(stage, self._clock(), detail))

    def heartbeat(self, session_id: str) -> Session:
        """The learner is there; ``NotLive`` when the session is closing or over."""
        now = self._clock()
        return self.store.update(session_id, lambda s: s.heartbeat(now))

    def extend(self, session_id: str) -> Session:
        """One more step of lifetime; ``ExtensionRefused`` says which rule forbids it."""
        now = self._clock()
        session = self.store.update(session_id, lambda current: extend(current, now=now))
        log.info("session.extended", session_id=session_id, expires_at=session.expires_at)
        return session

    # -- ending -----------------------------------------------------------------------------

    def fail(self, session_id: str, failure: Failure, *, teardown: bool = True) -> bool:
        """Fail a live session and queue the removal of its environment; True if this call
        failed it (a session already closing or over is left as it is)."""
        now = self._clock()
        _, moved = self._move(session_id, lambda s: s.fail(failure, at=now))
        if moved:
            log.warning("session.failed", session_id=session_id, reason=failure.message)
            if teardown:
                self._queue.enqueue(TEARDOWN, {"session_id": session_id})
        return moved

    def close(self, session_id: str, reason: CloseReason) -> Session:
        """Close a live session and queue its teardown, once however often it is asked."""
        now = self._clock()
        session, moved = self._move(session_id, lambda s: s.close(reason, at=now))
        if session is None:
            raise SessionNotFound(session_id)
        if moved:
            self._queue.enqueue(TEARDOWN, {"session_id": session_id})
            log.info("session.closing", session_id=session_id, reason=reason.value)
        return session

    def closing_for_teardown(self, session_id: str) -> Session | None:
        """The session a teardown works on, closed first if it was still live (a teardown
        that arrives on its own closes the session as ``closed``); None if it is gone."""
        now = self._clock()
        session, _ = self._move(session_id, lambda s: s.close(CloseReason.CLOSED, at=now))
        return session

    def finish(self, session_id: str) -> bool:
        """A closing session whose environment is gone: True if this call ended it."""
        now = self._clock()
        _, moved = self._move(session_id, lambda s: s.finish(at=now))
        if moved:
            log.info("session.ended", session_id=session_id)
        return moved

    def close_disconnected(self, *, grace: float) -> list[str]:
        """Close every live session whose browser connections all went away more than
        ``grace`` seconds ago and none came back (a closed tab); the ids closed now.

        Connections of a gateway that died count as gone once their lease runs out. Several
        reapers may run this at once: each due session is taken by one of them.
        """
        if self._connections is None:
            return []
        now = self._clock()
        self._connections.expire_leases(now=now)
        closed = []
        for session_id in self._connections.take_due(now=now, grace=grace):
            try:
                session = self.close(session_id, CloseReason.DISCONNECTED)
            except SessionNotFound:
                continue
            if session.ended_by == CloseReason.DISCONNECTED.value:
                closed.append(session_id)
        return closed

    def restore(self, session: Session) -> bool:
        """Store a session rebuilt from the cluster unless it exists; True if stored."""
        return self.store.restore(session)

    # -- deadlines ----------------------------------------------------------------------------

    def reap(self, *, batch: int, rng: random.Random | None = None) -> Reaped:
        """Settle every due deadline (at most ``batch`` per kind); queue what this caller won.

        ``rng`` shuffles each batch, so reapers running at once start on different sessions
        instead of queueing behind each other on the same ones.
        """
        now = self._clock()
        reaped = Reaped()
        for kind in DEADLINE_KINDS:
            due = self.store.due(kind, now, batch)
            if rng is not None:
                rng.shuffle(due)
            for session_id in due:
                outcome = self.settle(kind, session_id, now=now)
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
                else:
                    reaped.warnings.append(session_id)
                    log.info("session.expiring_soon", session_id=session_id, **outcome.detail)
        for closed in reaped.teardowns:
            self._queue.enqueue(TEARDOWN, {"session_id": closed})
        return reaped

    def settle(self, kind: DeadlineKind, session_id: str, *, now: float) -> DeadlineOutcome | None:
        """Apply one due deadline in one transaction; None if the session's document is gone.

        The outcome's effect is set only for the caller whose transaction committed the
        change: a second reaper re-reads the session, finds the deadline moved on and does
        nothing.
        """
        outcomes: list[DeadlineOutcome] = []

        def change(current: Session) -> Session:
            outcomes.clear()
            outcome = on_deadline(current, kind, now=now, policy=self.store.policy)
            outcomes.append(outcome)
            return outcome.session

        def announce(_before: Session, _after: Session) -> ProgressEvent | None:
            outcome = outcomes[-1]
            if outcome.effect is Effect.WARN:
                return ProgressEvent(Stage.EXPIRING_SOON, now, dict(outcome.detail))
            return None

        try:
            # reindex: even when nothing changes, the stale deadline entry is replaced.
            self.store.update(session_id, change, reindex=True, announce=announce)
        except SessionNotFound:
            self.store.forget_deadline(kind, session_id)
            return None
        return outcomes[-1]

    # -- one way to move ----------------------------------------------------------------------

    def _move(
        self,
        session_id: str,
        operation: Callable[[Session], Session],
        *,
        announce: Callable[[Session, Session], ProgressEvent | None] | None = None,
    ) -> tuple[Session | None, bool]:
        """Apply a domain operation if the session's life allows it now.

        Returns the session as stored afterwards (None if it does not exist) and whether this
        call moved it; an operation the current state refuses changes nothing.
        """
        moved: list[bool] = []

        def change(current: Session) -> Session:
            moved.clear()
            try:
                updated = operation(current)
            except (IllegalTransition, NotLive):
                return current
            moved.append(True)
            return updated

        try:
            session = self.store.update(session_id, change, announce=announce)
        except SessionNotFound:
            return None, False
        return session, bool(moved)
