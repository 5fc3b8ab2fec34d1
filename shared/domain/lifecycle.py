"""The rules of a session's life in time: clocks, deadlines, extension, warnings, admission.

Pure Python and clock-free: every rule takes ``now``. The API, the reaper and the reconciler ask
these functions; the adapters only store what they answer (deadlines in sorted sets, progress
events in streams).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Final

from shared.domain.reasons import CloseReason, Failure
from shared.domain.sessions import Session, SessionState, open_session
from shared.domain.templates import Template


class DeadlineKind(StrEnum):
    """What a deadline sorted set is about; the reaper visits them in this order."""

    STARTUP = "startup"
    PROVISION = "provision"  # a provision whose environment is not created yet: ask again
    LIFETIME = "lifetime"
    IDLE = "idle"
    TEARDOWN = "teardown"
    WARNING = "warning"


DEADLINE_KINDS: Final = tuple(DeadlineKind)


# -- clocks ----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ClockOverrides:
    """Operator overrides of every template's clocks (None: the template's own value)."""

    max_lifetime_seconds: int | None = None
    idle_timeout_seconds: int | None = None
    startup_timeout_seconds: int | None = None
    extend_step_seconds: int | None = None
    hard_deadline_seconds: int | None = None


@dataclass(frozen=True, kw_only=True)
class SessionClocks:
    """The clocks one new session starts with."""

    max_lifetime_seconds: int
    idle_timeout_seconds: int
    startup_timeout_seconds: int
    extend_step_seconds: int
    hard_deadline_seconds: int


def clocks_for(template: Template, overrides: ClockOverrides | None = None) -> SessionClocks:
    """The template's clocks with the operator's overrides applied.

    The hard deadline never falls before the lifetime: an override that shortens the lifetime
    below it is honoured, one that lengthens the lifetime past it lifts the hard deadline too.
    """
    o = overrides or ClockOverrides()
    lifetime = _pick(o.max_lifetime_seconds, template.max_lifetime_seconds)
    return SessionClocks(
        max_lifetime_seconds=lifetime,
        idle_timeout_seconds=_pick(o.idle_timeout_seconds, template.idle_timeout_seconds),
        startup_timeout_seconds=_pick(o.startup_timeout_seconds, template.startup_timeout_seconds),
        extend_step_seconds=_pick(o.extend_step_seconds, template.extend_step_seconds),
        hard_deadline_seconds=max(
            lifetime, _pick(o.hard_deadline_seconds, template.hard_deadline_seconds)
        ),
    )


def start_session(
    *, user: str, template: str, region: str, clocks: SessionClocks, now: float
) -> tuple[Session, str]:
    """A new session with every clock set, and its token (see ``open_session``)."""
    return open_session(
        user=user,
        template=template,
        region=region,
        max_lifetime_seconds=clocks.max_lifetime_seconds,
        idle_timeout_seconds=clocks.idle_timeout_seconds,
        now=now,
        startup_timeout_seconds=clocks.startup_timeout_seconds,
        extend_step_seconds=clocks.extend_step_seconds,
        hard_deadline_seconds=clocks.hard_deadline_seconds,
    )


def _pick(override: int | None, default: int) -> int:
    return default if override is None else override


# -- deadlines -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DeadlinePolicy:
    """Platform-wide knobs of the deadline rules (the per-session ones live on the session)."""

    # Lead before the end at which ``expiring-soon`` is sent (0: never). Capped at half the
    # clock's span, so a 4-second idle timeout warns after 2 s, not at once.
    expiry_warning_seconds: float = 300.0
    # A session still ``terminating`` this long after its teardown was asked for gets another.
    teardown_retry_seconds: float = 300.0
    # A provisioning session whose environment is not created this long after its provision
    # was asked for gets another (its worker died holding the task; provisions are idempotent).
    provision_retry_seconds: float = 15.0


def ending(session: Session) -> tuple[DeadlineKind, float]:
    """Which clock ends the session first if nothing changes, and when."""
    if session.expires_at <= session.idle_expires_at:
        return DeadlineKind.LIFETIME, session.expires_at
    return DeadlineKind.IDLE, session.idle_expires_at


def warning_at(session: Session, policy: DeadlinePolicy) -> float | None:
    """When to warn that the session ends soon; None when there is nothing (more) to warn of."""
    if policy.expiry_warning_seconds <= 0 or not session.is_live:
        return None
    kind, deadline = ending(session)
    if session.warned_for == deadline:
        return None
    span = (
        session.expires_at - session.created_at
        if kind is DeadlineKind.LIFETIME
        else float(session.idle_timeout_seconds)
    )
    return deadline - min(policy.expiry_warning_seconds, span / 2)


def deadlines(session: Session, policy: DeadlinePolicy) -> dict[DeadlineKind, float]:
    """Every deadline the reaper must watch for this session, by kind (absent: none)."""
    due: dict[DeadlineKind, float] = {}
    if session.is_live:
        due[DeadlineKind.LIFETIME] = session.expires_at
        due[DeadlineKind.IDLE] = session.idle_expires_at
        warn = warning_at(session, policy)
        if warn is not None:
            due[DeadlineKind.WARNING] = warn
    if session.state is SessionState.PROVISIONING and session.startup_expires_at is not None:
        due[DeadlineKind.STARTUP] = session.startup_expires_at
    if session.state is SessionState.PROVISIONING and not session.environment_created:
        asked = session.provision_requested_at
        if asked is None:  # the first provision, queued as the session opened
            asked = session.created_at
        due[DeadlineKind.PROVISION] = asked + policy.provision_retry_seconds
    if session.state is SessionState.TERMINATING:
        asked = session.teardown_requested_at
        if asked is None:  # written before the field existed: count from the transition
            asked = session.history[-1].at if session.history else session.created_at
        due[DeadlineKind.TEARDOWN] = asked + policy.teardown_retry_seconds
    return due


class Effect(StrEnum):
    """What the reaper must do once the new session is stored."""

    TEARDOWN = "teardown"  # enqueue the teardown of the environment
    PROVISION = "provision"  # enqueue the provision of the environment again
    WARN = "warn"  # emit ``expiring-soon``


@dataclass(frozen=True)
class DeadlineOutcome:
    """A due deadline's result: the session to store, and what to do after storing it."""

    session: Session
    effect: Effect | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)


def on_deadline(
    session: Session, kind: DeadlineKind, *, now: float, policy: DeadlinePolicy
) -> DeadlineOutcome:
    """Apply the rule of a deadline the reaper found due.

    The deadline may have moved since it was read (a heartbeat, an extension, a state change):
    then nothing happens and the session, stored again, is indexed afresh.
    """
    live = session.is_live
    if kind is DeadlineKind.STARTUP:
        started = session.startup_expires_at
        if session.state is SessionState.PROVISIONING and started is not None and now >= started:
            failure = Failure.startup_timeout(started - session.created_at)
            failed = session.fail(failure, at=now)
            return DeadlineOutcome(failed, Effect.TEARDOWN, {"reason": failure.message})
    elif kind is DeadlineKind.LIFETIME:
        if live and now >= session.expires_at:
            ended = session.close(CloseReason.LIFETIME, at=now)
            return DeadlineOutcome(ended, Effect.TEARDOWN, {"reason": CloseReason.LIFETIME.value})
    elif kind is DeadlineKind.IDLE:
        if live and now >= session.idle_expires_at:
            ended = session.close(CloseReason.IDLE, at=now)
            return DeadlineOutcome(ended, Effect.TEARDOWN, {"reason": CloseReason.IDLE.value})
    elif kind is DeadlineKind.TEARDOWN:
        retry_at = deadlines(session, policy).get(DeadlineKind.TEARDOWN)
        if retry_at is not None and now >= retry_at:
            again = replace(session, teardown_requested_at=now)
            return DeadlineOutcome(again, Effect.TEARDOWN, {"retry": True})
    elif kind is DeadlineKind.PROVISION:
        retry_at = deadlines(session, policy).get(DeadlineKind.PROVISION)
        if retry_at is not None and now >= retry_at:
            again = replace(session, provision_requested_at=now)
            return DeadlineOutcome(again, Effect.PROVISION, {"retry": True})
    elif kind is DeadlineKind.WARNING:
        warn = warning_at(session, policy)
        if warn is not None and now >= warn:
            which, deadline = ending(session)
            warned = replace(session, warned_for=deadline)
            detail = {"deadline": which.value, "ends_at": deadline, "seconds_left": deadline - now}
            return DeadlineOutcome(warned, Effect.WARN, detail)
    return DeadlineOutcome(session)


# -- extension -------------------------------------------------------------------------------


class ExtensionRefused(ValueError):
    """An extension the session's rules do not allow; ``code`` says which rule."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def extend(session: Session, *, now: float) -> Session:
    """The session with its lifetime moved by one step, capped at the hard deadline.

    An extension is also a sign of life, so the idle clock starts again.
    """
    if not session.is_live:
        raise ExtensionRefused("session_closed", f"the session is {session.state.value}")
    if now >= session.expires_at:
        raise ExtensionRefused("session_expired", "the session's lifetime is already over")
    hard = session.hard_expires_at
    if hard is None or session.extend_step_seconds <= 0:
        raise ExtensionRefused("not_extendable", "this session cannot be extended")
    if session.expires_at >= hard:
        raise ExtensionRefused(
            "hard_deadline_reached",
            "the session already runs until its hard deadline and cannot be extended further",
        )
    extended = replace(
        session, expires_at=min(session.expires_at + session.extend_step_seconds, hard)
    )
    return extended.seen(now)


# -- one session per user ----------------------------------------------------------------------


class Decision(StrEnum):
    OPEN = "open"  # make a new session (after closing ``to_close``, if any)
    RECONNECT = "reconnect"  # answer with ``session``, which the user already has
    REFUSE = "refuse"  # the user is at their limit with other templates


@dataclass(frozen=True)
class Admission:
    decision: Decision
    session: Session | None = None
    to_close: tuple[Session, ...] = ()
    conflicting: tuple[Session, ...] = ()

    @property
    def counts_as_demand(self) -> bool:
        """Whether this create is a new arrival for the pool's demand: a reconnect is not, nor
        a replace of the user's live session (one learner asking again, however often)."""
        return self.decision is Decision.OPEN and not self.to_close


def admit(
    existing: Iterable[Session],
    *,
    template: str,
    region: str | None,
    max_sessions: int,
    replace_existing: bool,
) -> Admission:
    """What a create request for ``template`` means, given the user's sessions.

    Only live sessions count (a terminating one is already on its way out). The same template
    in the same region is a reconnect (a page reload); ``region`` None (the request let labvirt
    choose the region) reconnects to the template's session in any region. ``replace_existing``
    closes every live session of the user and opens a fresh one; otherwise a user at the limit
    is refused.
    """
    live = sorted((s for s in existing if s.is_live), key=lambda s: (s.created_at, s.id))
    if replace_existing:
        return Admission(Decision.OPEN, to_close=tuple(live))
    same = [s for s in live if s.template == template and (region is None or s.region == region)]
    if same:
        return Admission(Decision.RECONNECT, session=same[-1])
    if len(live) >= max_sessions:
        return Admission(Decision.REFUSE, conflicting=tuple(live))
    return Admission(Decision.OPEN)


# -- progress ----------------------------------------------------------------------------------


class Stage(StrEnum):
    """What a learner's frontend is told while it waits and while it works."""

    QUEUED = "queued"
    CREATING = "creating"
    BOOTING = "booting"
    READY = "ready"
    EXPIRING_SOON = "expiring-soon"
    ENDED = "ended"
    FAILED = "failed"


# After one of these the learner's session is over: nothing more will follow.
TERMINAL_STAGES: Final = frozenset({Stage.ENDED, Stage.FAILED})

_STAGE_OF_STATE: Final[Mapping[SessionState, Stage]] = {
    SessionState.PROVISIONING: Stage.QUEUED,
    SessionState.READY: Stage.READY,
    # For the learner the session ends when it stops serving, not when the VMs are gone.
    SessionState.TERMINATING: Stage.ENDED,
    SessionState.FAILED: Stage.FAILED,
}


@dataclass(frozen=True)
class ProgressEvent:
    stage: Stage
    at: float
    detail: Mapping[str, Any] = field(default_factory=dict)

    def to_fields(self) -> dict[str, str]:
        return {
            "stage": self.stage.value,
            "at": repr(self.at),
            "detail": json.dumps(dict(self.detail), separators=(",", ":")),
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> ProgressEvent:
        return cls(Stage(fields["stage"]), float(fields["at"]), json.loads(fields["detail"]))


def transition_event(before: Session | None, after: Session) -> ProgressEvent | None:
    """The progress event a stored change means: one per state change, none otherwise."""
    if before is not None and before.state is after.state:
        return None
    stage = _STAGE_OF_STATE.get(after.state)
    if stage is None:
        return None
    last = after.history[-1] if after.history else None
    at = last.at if last is not None and last.state is after.state else after.created_at
    detail: dict[str, Any] = {"state": after.state.value}
    reason = last.reason if last is not None and last.state is after.state else None
    if reason is not None:
        detail["reason"] = reason
    return ProgressEvent(stage, at, detail)


def booting_event(*, ready: int, total: int, at: float) -> ProgressEvent:
    return ProgressEvent(Stage.BOOTING, at, {"ready": ready, "total": total})


def booting_progress(before: Session, after: Session, *, at: float) -> ProgressEvent | None:
    """The ``booting`` event a change of a provisioning session's VMs means, if any: one when
    the VMs first show up and one each time the number of ready VMs changes (the last one
    comes with the change to ``ready``)."""
    if before.state is not SessionState.PROVISIONING or not after.vms:
        return None
    ready = sum(1 for vm in after.vms if vm.ready)
    if before.vms and ready == sum(1 for vm in before.vms if vm.ready):
        return None
    return booting_event(ready=ready, total=len(after.vms), at=at)
