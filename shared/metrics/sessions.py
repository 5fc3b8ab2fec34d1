"""What a session's committed change of state means for the series.

The session store calls ``record_transition`` for every change of state it commits, whichever
process made it (the API, a worker's informer, the reaper, the reconciler), so each change is
counted once: a cold session ready (its time to ready), a session ended or failed (why), a
session failed before it was ready (a provisioning failure). A warm session's time to ready
is recorded where it claims its environment (``shared.warm_claim``): its document only knows
the claim, which is when its clocks start.
"""

from __future__ import annotations

from shared.domain.reasons import CloseReason
from shared.domain.sessions import Session, SessionState
from shared.metrics.series import series


def record_transition(before: Session | None, after: Session) -> None:
    if before is None or before.state is after.state:
        return
    booting = before.state is SessionState.PROVISIONING
    if booting and after.state is SessionState.READY and not after.warm:
        ready_at = after.history[-1].at if after.history else after.created_at
        series().time_to_ready.labels(
            template=after.template, region=after.region, path="cold"
        ).observe(max(0.0, ready_at - after.created_at))
    if not after.is_final:
        return
    reason = reason_label(after.ended_by)
    series().sessions_ended.labels(
        template=after.template, region=after.region, state=after.state.value, reason=reason
    ).inc()
    if booting and after.state is SessionState.FAILED:
        series().provisioning_failures.labels(
            template=after.template, region=after.region, reason=reason
        ).inc()


def reason_label(ended_by: str | None) -> str:
    """A close reason or failure kind as a label: short and from a fixed set."""
    if ended_by is None:
        return "unknown"
    try:
        return CloseReason(ended_by).name.lower()  # "idle", not "idle timeout"
    except ValueError:
        return ended_by  # a FailureKind value: already a label
