"""What ``SessionLife``'s operations answer besides a session: openings, refusals, reaping."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.domain.sessions import Session


@dataclass(frozen=True)
class Opened:
    """A create's answer: a new session with its token, or the user's own to reconnect to."""

    session: Session
    token: str | None
    reconnected: bool = False
    region_reason: str | None = None  # why the session is in its region


class SessionLimitReached(Exception):
    """The user already holds as many live sessions of other templates as allowed."""

    def __init__(self, user: str, conflicting: tuple[Session, ...], limit: int) -> None:
        super().__init__(f"user {user!r} already has {len(conflicting)} active session(s)")
        self.user = user
        self.conflicting = conflicting
        self.limit = limit


class NotQueued(Exception):
    """The session was stored but its first task could not be queued; it is failed."""


@dataclass
class Reaped:
    """What one reaper pass settled: sessions closed or failed, sessions warned, and
    provisions asked for again (lost with their worker)."""

    teardowns: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    provisions: list[str] = field(default_factory=list)


class ProvisioningFailed(Exception):
    """An environment that could not be brought up (every boot failed), as a dead letter."""
