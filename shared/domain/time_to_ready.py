"""How long learners waited for their environment: time to ready, per template, warm or cold.

A session's time to ready is from the start of the provisioning that made it ready to its
first ``ready``: from its creation, or, for a failed session an operator requeued, from its
reopening (the hours it lay failed are no boot time). A warm claim is ready at creation.
Operators read the median and the 95th percentile of recent sessions to see whether pools are
sized well and clusters boot as fast as they should.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from shared.domain.sessions import Session, SessionState


@dataclass(frozen=True)
class ReadyTimes:
    """The recent sessions of one template that started warm (or cold): how many, and the
    median and 95th percentile of their times to ready, in seconds."""

    template: str
    warm: bool
    count: int
    p50_seconds: float
    p95_seconds: float


def time_to_ready(session: Session) -> float | None:
    """Seconds from the last ``provisioning`` before the first ``ready`` to that ``ready``;
    None for a session never ready."""
    started = session.created_at
    for transition in session.history:
        if transition.state is SessionState.PROVISIONING:
            started = transition.at
        elif transition.state is SessionState.READY:
            return max(0.0, transition.at - started)
    return None


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (a value that occurred, never an interpolation)."""
    if not values:
        raise ValueError("no values")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction {fraction} is not in (0, 1]")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def ready_times(sessions: Iterable[Session], *, newest: int) -> list[ReadyTimes]:
    """The statistics of the ``newest`` sessions (by creation) that became ready, by template
    then cold before warm."""
    recent = sorted(sessions, key=lambda s: s.created_at, reverse=True)
    waits: dict[tuple[str, bool], list[float]] = {}
    taken = 0
    for session in recent:
        if taken == newest:
            break
        seconds = time_to_ready(session)
        if seconds is None:
            continue
        waits.setdefault((session.template, session.warm), []).append(seconds)
        taken += 1
    return [
        ReadyTimes(
            template=template,
            warm=warm,
            count=len(values),
            p50_seconds=percentile(values, 0.5),
            p95_seconds=percentile(values, 0.95),
        )
        for (template, warm), values in sorted(waits.items())
    ]
