"""Why a session ends: the closing reasons and the typed failures, with their sentences.

A service never writes a reason string: it names a ``CloseReason`` or builds a ``Failure`` from
one of its constructors, and the session's operations (``shared.domain.sessions``) record it.
The kinds are a small, fixed set, safe to use as a metric label; the sentence is what the
learner's frontend shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class CloseReason(StrEnum):
    """Why a live session was closed; the value is what the learner's frontend is told."""

    DELETED = "deleted"  # DELETE by the frontend
    CLOSED = "closed"  # the learner closed it (a beacon) or a teardown arrived first
    REPLACED = "replaced"  # the user opened another template with "replace": true
    LIFETIME = "maximum lifetime reached"
    IDLE = "idle timeout"
    DISCONNECTED = "disconnected"  # every connection of the learner went away


class FailureKind(StrEnum):
    """What kind of trouble failed a session (a small, fixed set: safe as a metric label)."""

    STARTUP_TIMEOUT = "startup_timeout"
    VM_FAILED = "vm_failed"
    VM_VANISHED = "vm_vanished"
    CLUSTER_ERROR = "cluster_error"
    NOT_QUEUED = "not_queued"
    TEMPLATE_MISSING = "template_missing"
    WARM_ENVIRONMENT_LOST = "warm_environment_lost"


@dataclass(frozen=True)
class Failure:
    """Why a session failed: a kind, and the sentence the learner's frontend shows."""

    kind: FailureKind
    message: str

    @classmethod
    def startup_timeout(cls, seconds: float) -> Failure:
        return cls(
            FailureKind.STARTUP_TIMEOUT,
            f"environment did not become ready within {round(seconds)} s (startup timeout)",
        )

    @classmethod
    def vm_failed(cls, problem: str) -> Failure:
        """A VM that can no longer serve (``shared.domain.vmi_status.failure_of``)."""
        return cls(FailureKind.VM_FAILED, problem)

    @classmethod
    def vm_vanished(cls, vm_name: str) -> Failure:
        return cls(FailureKind.VM_VANISHED, f"VM {vm_name} vanished from the cluster")

    @classmethod
    def cluster_error(cls, error: str) -> Failure:
        return cls(FailureKind.CLUSTER_ERROR, f"cluster error: {error}")

    @classmethod
    def not_queued(cls) -> Failure:
        return cls(FailureKind.NOT_QUEUED, "could not queue provisioning")

    @classmethod
    def template_missing(cls, template: str) -> Failure:
        return cls(FailureKind.TEMPLATE_MISSING, f"template {template!r} is not configured")

    @classmethod
    def warm_environment_lost(cls, problem: str) -> Failure:
        return cls(FailureKind.WARM_ENVIRONMENT_LOST, problem)

    @classmethod
    def warm_environment_unbound(cls, error: str) -> Failure:
        return cls(
            FailureKind.WARM_ENVIRONMENT_LOST, f"could not bind the warm environment: {error}"
        )
