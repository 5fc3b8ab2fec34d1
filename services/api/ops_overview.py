"""What the operators' dashboard shows, read from Redis the way the admin API reads it.

Pools come from the admin API's own listing (``services.api.admin.pools_body``); live
sessions from the per-region indexes Redis keeps anyway (a few ``SCARD``s); failures from the
dead letters, newest first; time to ready from the documents of live and recently finished
sessions (the ones ``GET /v1/admin/sessions`` lists), the newest ``RECENT_SESSIONS`` of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from services.api.admin import pool_store, pools_body
from services.api.errors import ApiError
from services.api.ops_chart import ReadyChart, ready_chart
from shared.adapters.dead_letters import DeadLetter, Status
from shared.domain.pools.config import PoolMode
from shared.domain.time_to_ready import ready_times
from shared.runtime import Runtime

RECENT_SESSIONS: Final = 200
RECENT_FAILURES: Final = 25
BAR_WIDTH: Final = 120
ERROR_CHARS: Final = 160


@dataclass(frozen=True)
class PoolRow:
    template: str
    region: str
    mode: str
    target: int
    ready: int
    in_flight: int
    paused: bool  # this pool's own switch
    held: bool  # not filling: paused itself, or every pool is
    size: int  # what the resize form starts from
    # The bar: ready, then in flight, on a scale where the target mark sits at ``target_x``.
    ready_width: float
    in_flight_width: float
    target_x: float


@dataclass(frozen=True)
class LiveRow:
    region: str
    total: int
    booting: int
    by_template: tuple[int, ...]


@dataclass(frozen=True)
class FailureRow:
    id: str
    task: str
    error: str
    attempts: int
    status: str
    last_failed: str  # UTC, to the second
    last_failed_ago: str
    requeued_by: str  # the last requeue's operator, "" when never requeued
    can_requeue: bool


@dataclass(frozen=True)
class Overview:
    pools: tuple[PoolRow, ...]
    all_paused: bool
    pools_problem: str  # why pools are not shown, "" when they are
    templates: tuple[str, ...]
    live: tuple[LiveRow, ...]
    live_total: int
    failures: tuple[FailureRow, ...]
    failures_total: int
    chart: ReadyChart | None
    chart_sessions: int


def overview(rt: Runtime) -> Overview:
    now = rt.clock()
    templates = tuple(sorted(rt.templates))
    pools, all_paused, problem = _pools(rt)
    counts = rt.sessions.live_counts(list(rt.settings.regions), list(templates))
    live = tuple(
        LiveRow(
            region=region,
            total=count.total,
            booting=count.booting,
            by_template=tuple(count.by_template.get(t, 0) for t in templates),
        )
        for region, count in counts.items()
    )
    letters, _ = rt.dead_letters.list(limit=RECENT_FAILURES)
    sessions = [*rt.sessions.live_sessions(), *rt.sessions.finished_sessions(limit=RECENT_SESSIONS)]
    stats = ready_times(sessions, newest=RECENT_SESSIONS)
    return Overview(
        pools=pools,
        all_paused=all_paused,
        pools_problem=problem,
        templates=templates,
        live=live,
        live_total=sum(row.total for row in live),
        failures=tuple(_failure_row(letter, now) for letter in letters),
        failures_total=rt.dead_letters.count(),
        chart=ready_chart(stats),
        chart_sessions=sum(s.count for s in stats),
    )


def _pools(rt: Runtime) -> tuple[tuple[PoolRow, ...], bool, str]:
    try:
        store = pool_store(rt)
    except ApiError as exc:
        return (), False, exc.message
    listing = pools_body(rt, store)
    return tuple(_pool_row(pool) for pool in listing["pools"]), listing["paused"], ""


def _pool_row(pool: dict[str, Any]) -> PoolRow:
    config = pool["config"]
    target, ready, in_flight = pool["target"], pool["ready"], pool["in_flight"]
    scale = max(target, ready + in_flight, 1)
    return PoolRow(
        template=pool["template"],
        region=pool["region"],
        mode=PoolMode(pool["mode"]).value,
        target=target,
        ready=ready,
        in_flight=in_flight,
        paused=config.paused,
        held=pool["paused"],
        size=config.size if config.mode is PoolMode.STATIC else target,
        ready_width=round(ready / scale * BAR_WIDTH, 1),
        in_flight_width=round(in_flight / scale * BAR_WIDTH, 1),
        target_x=round(target / scale * BAR_WIDTH, 1),
    )


def _failure_row(letter: DeadLetter, now: float) -> FailureRow:
    error = " ".join(letter.error.split())
    if len(error) > ERROR_CHARS:
        error = error[: ERROR_CHARS - 1] + "…"
    requeues = letter.requeues
    return FailureRow(
        id=letter.id,
        task=letter.task,
        error=error,
        attempts=letter.attempts,
        status=letter.status,
        last_failed=moment(letter.last_failed_at),
        last_failed_ago=ago(now - letter.last_failed_at),
        requeued_by=str(requeues[-1].get("by", "")) if requeues else "",
        can_requeue=letter.status != Status.REQUEUED,
    )


def moment(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} days ago"
