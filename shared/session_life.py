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
from shared.adapters.dead_letters import DeadLetters
from shared.adapters.pool_store import RedisPoolStore
from shared.adapters.rate_limits import CountAlong
from shared.adapters.session_events import SessionEvents
from shared.adapters.session_store import RedisSessionStore, SessionNotFound
from shared.domain.lifecycle import (
    DeadlineKind,
    DeadlineOutcome,
    ProgressEvent,
    SessionClocks,
    Stage,
    booting_progress,
    extend,
)
from shared.domain.reasons import CloseReason, Failure
from shared.domain.regions import RegionHint
from shared.domain.retries import may_replace, reopened, with_fresh_environment
from shared.domain.sessions import (
    EnvironmentId,
    IllegalTransition,
    NotLive,
    Session,
    SessionState,
    VmView,
    new_ids,
)
from shared.jobs import PROVISION, RETIRE_ENVIRONMENT, TEARDOWN, TaskQueue
from shared.regions import RegionPicker
from shared.session_opening import SessionOpener
from shared.session_reaping import reap_due, settle_deadline
from shared.session_results import (
    Opened,
    ProvisioningFailed,
    Reaped,
)

log = structlog.get_logger(__name__)


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
        dead_letters: DeadLetters | None = None,
        max_sessions_per_user: int = 1,
        regions: RegionPicker | None = None,
    ) -> None:
        self.store = store
        self._events = events
        self._queue = queue
        self._clock = clock
        self._pools = pools
        self._connections = connections
        self._dead_letters = dead_letters
        self._max_sessions_per_user = max_sessions_per_user
        self._regions = regions
        self._opener = SessionOpener(
            store=store,
            queue=queue,
            clock=clock,
            pools=pools,
            regions=regions,
            max_sessions_per_user=max_sessions_per_user,
            close=self.close,
            fail_unqueued=self._fail_unqueued,
        )

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
        counting: CountAlong | None = None,
    ) -> Opened:
        """One active session per user: reconnect, refuse, or open (closing replaced ones).

        Creates for one user are serialised by a Redis lock (``UserBusy`` when it is held
        too long), so a double click cannot open two sessions.

        The region is decided here and nowhere else: ``region`` names one (shorthand for
        ``RegionHint(region=...)``), ``hint`` may instead give a location or a country, or
        nothing. A reconnect keeps the user's session where it is; otherwise the region picker
        (``shared.regions``) chooses before anything is closed or stored, and raises
        ``UnknownRegion`` or ``NoRegion`` (full, at a cap, down, drained) when none can take
        it. Only a create that is neither a reconnect nor a replace counts as pool demand.

        ``counting``: the create's rate limits, counted in the round trip that takes the lock
        (``RateLimited`` when one refuses it). The steps are ``shared.session_opening``'s.
        """
        if region is not None:
            hint = RegionHint(region=region)
        return self._opener.open(
            user=user,
            template=template,
            clocks=clocks,
            replace=replace,
            hint=hint or RegionHint(),
            counting=counting,
        )

    def _fail_unqueued(self, session_id: str) -> None:
        self._move(session_id, lambda s: s.fail(Failure.not_queued(), at=self._clock()))

    # -- while it boots and serves ------------------------------------------------------------

    def record_progress(self, session_id: str, vms: list[VmView]) -> None:
        """A booting session's VMs, and a ``booting`` event (in the same transaction, so two
        observers send it once) when the number of ready ones changes."""
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

    def fail(
        self,
        session_id: str,
        failure: Failure,
        *,
        teardown: bool = True,
        provisioning_failed: bool = False,
    ) -> bool:
        """Fail a live session and queue the removal of its environment; True if this call
        failed it (a session already closing or over is left as it is).

        ``provisioning_failed``: its environment could not be brought up (every boot
        failed): the provisioning goes to the dead letters, for an operator to requeue.
        """
        now = self._clock()
        session, moved = self._move(session_id, lambda s: s.fail(failure, at=now))
        if moved:
            log.warning("session.failed", session_id=session_id, reason=failure.message)
            if teardown:
                self._queue.enqueue(TEARDOWN, {"session_id": session_id})
            if provisioning_failed and self._dead_letters is not None and session is not None:
                self._dead_letters.record(
                    task=PROVISION,
                    payload={"session_id": session_id},
                    task_id=None,
                    error=ProvisioningFailed(failure.message),
                    traceback="",
                    concerns={"session_id": session_id, "region": session.region},
                )
        return moved

    def replace_environment(self, session_id: str, *, boot_seconds: float) -> bool:
        """A VM failed to boot: give the session one fresh environment while its startup time
        allows (the failed one is deleted); False when it has had its second chance."""
        now = self._clock()
        fresh = EnvironmentId(new_ids()[1])
        replaced: list[Session] = []

        def change(current: Session) -> Session:
            if not may_replace(current, now=now, boot_seconds=boot_seconds):
                raise IllegalTransition(current.state, current.state)
            replaced.append(current)
            return with_fresh_environment(current, environment_id=fresh, at=now)

        _, moved = self._move(session_id, change)
        if moved:
            old = replaced[-1]
            log.warning(
                "session.environment_replaced",
                session_id=session_id,
                failed_environment=old.environment_id,
                environment_id=fresh,
            )
            self._queue.enqueue(
                RETIRE_ENVIRONMENT, {"environment_id": old.environment_id, "region": old.region}
            )
            self._queue.enqueue(PROVISION, {"session_id": session_id})
        return moved

    def reopen(self, session_id: str) -> Session:
        """A failed session provisions again (requeued); ``IllegalTransition`` if it cannot."""
        now = self._clock()
        fresh = EnvironmentId(new_ids()[1])
        session = self.store.update(session_id, lambda s: reopened(s, environment_id=fresh, at=now))
        log.info("session.reopened", session_id=session_id, environment_id=fresh)
        return session

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
        """The session a teardown works on, closed (``closed``) first if still live."""
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
        """Settle every due deadline; see ``shared.session_reaping``."""
        return reap_due(self.store, self._queue, now=self._clock(), batch=batch, rng=rng)

    def settle(self, kind: DeadlineKind, session_id: str, *, now: float) -> DeadlineOutcome | None:
        """Apply one due deadline; see ``shared.session_reaping``."""
        return settle_deadline(self.store, kind, session_id, now=now)

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
