"""The session: a learner's claim on one environment, and the rules of its life.

Pure Python: the state machine, the named operations that move a session through it (``mark_ready``,
``fail``, ``close``, ``finish``, ``heartbeat``), the typed reasons a session ends for, and the VM
view. Services never pick a state or write a reason themselves: they call these operations
through ``shared.session_life``. Adapters store sessions and move them between processes as JSON
(``to_dict``/``from_dict``).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, NewType

from shared.domain.reasons import CloseReason, Failure
from shared.domain.user_data import legacy_environment_token, new_environment_token

SessionId = NewType("SessionId", str)
EnvironmentId = NewType("EnvironmentId", str)

_USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,127}$")
HISTORY_LIMIT = 20


class SessionState(StrEnum):
    PROVISIONING = "provisioning"
    READY = "ready"
    TERMINATING = "terminating"
    ENDED = "ended"
    FAILED = "failed"


FINAL_STATES = frozenset({SessionState.ENDED, SessionState.FAILED})
# A live session serves its learner (or is about to): its clocks run and it may be closed.
LIVE_STATES = frozenset({SessionState.PROVISIONING, SessionState.READY})

_ALLOWED: Mapping[SessionState, frozenset[SessionState]] = {
    SessionState.PROVISIONING: frozenset(
        {SessionState.READY, SessionState.TERMINATING, SessionState.FAILED}
    ),
    SessionState.READY: frozenset({SessionState.TERMINATING, SessionState.FAILED}),
    SessionState.TERMINATING: frozenset({SessionState.ENDED, SessionState.FAILED}),
    SessionState.ENDED: frozenset(),
    SessionState.FAILED: frozenset(),
}


class IllegalTransition(ValueError):
    """A state change the session's life does not allow."""

    def __init__(self, current: SessionState, wanted: SessionState) -> None:
        super().__init__(f"a {current} session cannot become {wanted}")
        self.current = current
        self.wanted = wanted


class InvalidUser(ValueError):
    """A user id that labvirt will not put into labels and keys."""


class NotLive(ValueError):
    """An operation that only a live session (provisioning or ready) accepts."""

    def __init__(self, state: SessionState) -> None:
        super().__init__(f"the session is {state.value}")
        self.state = state


@dataclass(frozen=True)
class VmView:
    """What a learner's frontend needs to know of one VM."""

    name: str
    hostname: str
    ip: str | None = None
    phase: str = "Pending"
    ready: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "hostname": self.hostname,
            "ip": self.ip,
            "phase": self.phase,
            "ready": self.ready,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VmView:
        return cls(
            name=str(data["name"]),
            hostname=str(data["hostname"]),
            ip=data.get("ip"),
            phase=str(data.get("phase", "Pending")),
            ready=bool(data.get("ready", False)),
        )


@dataclass(frozen=True)
class Transition:
    state: SessionState
    at: float
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state.value, "at": self.at, "reason": self.reason}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Transition:
        return cls(SessionState(data["state"]), float(data["at"]), data.get("reason"))


@dataclass(frozen=True)
class Session:
    id: SessionId
    user: str
    template: str
    region: str
    environment_id: EnvironmentId
    token_hash: str
    created_at: float
    expires_at: float
    idle_timeout_seconds: int
    last_seen_at: float
    state: SessionState = SessionState.PROVISIONING
    warm: bool = False
    reason: str | None = None
    vms: tuple[VmView, ...] = ()
    history: tuple[Transition, ...] = field(default_factory=tuple)
    # Extension moves ``expires_at`` by ``extend_step_seconds``, never past ``hard_expires_at``
    # (None: no extension at all).
    hard_expires_at: float | None = None
    extend_step_seconds: int = 0
    # Provisioning that is not ready by then fails (None: no startup deadline).
    startup_expires_at: float | None = None
    # The deadline an ``expiring-soon`` warning was last sent for, so it is sent once per deadline.
    warned_for: float | None = None
    # When a teardown was last asked for; a session still terminating long after gets another.
    teardown_requested_at: float | None = None
    # The CloseReason or FailureKind value that ended the session (None while it is live).
    ended_by: str | None = None
    # The environment's cloud-init secret (kubeadm's bootstrap token for the kubernetes
    # template), chosen at open so a retried provision renders the same manifests. Kept out of
    # repr (logs), API bodies and the cluster's labels and annotations.
    environment_token: str = field(default_factory=new_environment_token, repr=False)
    # Fresh environments this session was given after a boot failed (``shared.domain.retries``).
    replacements: int = 0
    # When a provision was last asked for (None: as the session opened), and the environment
    # whose objects a provision finished creating: until that is this session's environment,
    # the reaper asks again (``shared.domain.lifecycle.deadlines``).
    provision_requested_at: float | None = None
    created_environment: EnvironmentId | None = None

    @property
    def idle_expires_at(self) -> float:
        return self.last_seen_at + self.idle_timeout_seconds

    @property
    def environment_created(self) -> bool:
        return self.created_environment == self.environment_id

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def is_live(self) -> bool:
        return self.state in LIVE_STATES

    # -- the named operations of a session's life -------------------------------------------

    def mark_ready(self, *, vms: Sequence[VmView], at: float) -> Session:
        """Every VM of a provisioning session is up: the learner may start."""
        return self.with_vms(vms).transition(SessionState.READY, at=at)

    def fail(self, failure: Failure, *, at: float) -> Session:
        """A live session that cannot serve any more; ``IllegalTransition`` once it is closing."""
        if not self.is_live:
            raise IllegalTransition(self.state, SessionState.FAILED)
        failed = self.transition(SessionState.FAILED, at=at, reason=failure.message)
        return replace(failed, ended_by=failure.kind.value)

    def close(self, reason: CloseReason, *, at: float) -> Session:
        """A live session on its way out: its environment is to be torn down."""
        closing = self.transition(SessionState.TERMINATING, at=at, reason=reason.value)
        return replace(closing, ended_by=reason.value)

    def finish(self, *, at: float) -> Session:
        """A closing session whose environment is gone."""
        return self.transition(SessionState.ENDED, at=at)

    def heartbeat(self, at: float) -> Session:
        """A sign of life from the learner: the idle clock starts again."""
        if not self.is_live:
            raise NotLive(self.state)
        return self.seen(at)

    def transition(self, wanted: SessionState, *, at: float, reason: str | None = None) -> Session:
        """The session in ``wanted`` state; ``IllegalTransition`` if its life forbids it."""
        if wanted not in _ALLOWED[self.state]:
            raise IllegalTransition(self.state, wanted)
        history = (*self.history, Transition(wanted, at, reason))[-HISTORY_LIMIT:]
        return replace(
            self,
            state=wanted,
            reason=reason if reason is not None else self.reason,
            history=history,
            teardown_requested_at=(
                at if wanted is SessionState.TERMINATING else self.teardown_requested_at
            ),
        )

    def with_vms(self, vms: Sequence[VmView]) -> Session:
        return replace(self, vms=tuple(vms))

    def warm_start(
        self, *, environment_id: EnvironmentId, vms: Sequence[VmView], at: float
    ) -> Session:
        """A just-opened session handed a booted environment from a warm pool: ``ready`` at
        once, and every clock counted from ``at`` (the claim), never from the pool's boot."""
        if self.state is not SessionState.PROVISIONING:
            raise IllegalTransition(self.state, SessionState.READY)
        shift = at - self.created_at

        def moved(moment: float | None) -> float | None:
            return None if moment is None else moment + shift

        started = replace(
            self,
            environment_id=environment_id,
            warm=True,
            created_at=at,
            expires_at=self.expires_at + shift,
            last_seen_at=at,
            hard_expires_at=moved(self.hard_expires_at),
            startup_expires_at=moved(self.startup_expires_at),
            history=tuple(replace(t, at=at) for t in self.history),
        )
        return started.with_vms(vms).transition(SessionState.READY, at=at)

    def seen(self, at: float) -> Session:
        """A heartbeat: the idle clock starts again."""
        return replace(self, last_seen_at=max(self.last_seen_at, at))

    def token_matches(self, token: str) -> bool:
        return hmac.compare_digest(self.token_hash, hash_token(token))

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user": self.user,
            "template": self.template,
            "region": self.region,
            "environment_id": self.environment_id,
            "token_hash": self.token_hash,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "idle_timeout_seconds": self.idle_timeout_seconds,
            "last_seen_at": self.last_seen_at,
            "state": self.state.value,
            "warm": self.warm,
            "reason": self.reason,
            "vms": [vm.to_dict() for vm in self.vms],
            "history": [t.to_dict() for t in self.history],
            "hard_expires_at": self.hard_expires_at,
            "extend_step_seconds": self.extend_step_seconds,
            "startup_expires_at": self.startup_expires_at,
            "warned_for": self.warned_for,
            "teardown_requested_at": self.teardown_requested_at,
            "ended_by": self.ended_by,
            "environment_token": self.environment_token,
            "replacements": self.replacements,
            "provision_requested_at": self.provision_requested_at,
            "created_environment": self.created_environment,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Session:
        return cls(
            id=SessionId(str(data["id"])),
            user=str(data["user"]),
            template=str(data["template"]),
            region=str(data["region"]),
            environment_id=EnvironmentId(str(data["environment_id"])),
            token_hash=str(data["token_hash"]),
            created_at=float(data["created_at"]),
            expires_at=float(data["expires_at"]),
            idle_timeout_seconds=int(data["idle_timeout_seconds"]),
            last_seen_at=float(data["last_seen_at"]),
            state=SessionState(data["state"]),
            warm=bool(data.get("warm", False)),
            reason=data.get("reason"),
            vms=tuple(VmView.from_dict(v) for v in data.get("vms", ())),
            history=tuple(Transition.from_dict(t) for t in data.get("history", ())),
            hard_expires_at=_optional_float(data.get("hard_expires_at")),
            extend_step_seconds=int(data.get("extend_step_seconds") or 0),
            startup_expires_at=_optional_float(data.get("startup_expires_at")),
            warned_for=_optional_float(data.get("warned_for")),
            teardown_requested_at=_optional_float(data.get("teardown_requested_at")),
            ended_by=data.get("ended_by"),
            # Recorded before labvirt stored a token: the one it derived then.
            replacements=int(data.get("replacements") or 0),
            provision_requested_at=_optional_float(data.get("provision_requested_at")),
            created_environment=(
                EnvironmentId(str(data["created_environment"]))
                if data.get("created_environment")
                else None
            ),
            environment_token=str(
                data.get("environment_token")
                or legacy_environment_token(str(data["token_hash"]), str(data["environment_id"]))
            ),
        )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def new_ids() -> tuple[SessionId, EnvironmentId]:
    """A fresh session id (unguessable) and environment id (short, DNS-label friendly)."""
    session_id = SessionId("s-" + secrets.token_hex(12))
    environment_id = EnvironmentId(secrets.token_hex(5))
    return session_id, environment_id


def new_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_user(user: str) -> str:
    # fullmatch: ``$`` alone would let a trailing newline through into keys and labels.
    if not _USER_RE.fullmatch(user):
        raise InvalidUser(
            "user must be 1-128 characters: letters, digits and _ . @ + - "
            "(starting with a letter or digit)"
        )
    return user


def open_session(
    *,
    user: str,
    template: str,
    region: str,
    max_lifetime_seconds: int,
    idle_timeout_seconds: int,
    now: float,
    startup_timeout_seconds: int | None = None,
    extend_step_seconds: int = 0,
    hard_deadline_seconds: int | None = None,
) -> tuple[Session, str]:
    """A new session in ``provisioning``, and its bearer token (returned to the caller once).

    Without ``hard_deadline_seconds`` the session cannot be extended; without
    ``startup_timeout_seconds`` only the provisioner bounds its start.
    """
    session_id, environment_id = new_ids()
    token = new_token()
    session = Session(
        id=session_id,
        user=check_user(user),
        template=template,
        region=region,
        environment_id=environment_id,
        token_hash=hash_token(token),
        created_at=now,
        expires_at=now + max_lifetime_seconds,
        idle_timeout_seconds=idle_timeout_seconds,
        last_seen_at=now,
        history=(Transition(SessionState.PROVISIONING, now),),
        hard_expires_at=(
            None
            if hard_deadline_seconds is None
            else now + max(hard_deadline_seconds, max_lifetime_seconds)
        ),
        extend_step_seconds=extend_step_seconds,
        startup_expires_at=(
            None if startup_timeout_seconds is None else now + startup_timeout_seconds
        ),
        environment_token=new_environment_token(),
    )
    return session, token
