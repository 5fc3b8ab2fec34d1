"""``labvirt.prewarm``: beat's tick of the warm pools; a thin adapter around ``Prewarmer``.

The tick talks to Redis only. Booting and retiring environments are the provisioner's tasks,
enqueued by name (routed to the ``prewarm`` queue that a worker of its own consumes), so
learners' provisioning never waits behind them.
"""

from __future__ import annotations

from typing import Any

import structlog
from celery import Task

from services.prewarmer.prewarmer import Prewarmer, PrewarmSettings
from shared.domain.pools.environments import WarmEnvironment
from shared.jobs import PREWARM, labvirt_task
from shared.runtime import Runtime, runtime_of

log = structlog.get_logger(__name__)


def build_prewarmer(runtime: Runtime) -> Prewarmer | None:
    """The runtime's prewarmer; None when the runtime has no pool store."""
    if runtime.pools is None:
        return None
    settings = runtime.settings

    def claim_is_live(env: WarmEnvironment) -> bool:
        session = runtime.sessions.get(env.session_id or "")
        return session is not None and session.environment_id == env.id and not session.is_final

    return Prewarmer(
        store=runtime.pools,
        templates=runtime.templates,
        regions=settings.regions,
        settings=PrewarmSettings(
            tick_seconds=settings.prewarm_interval_seconds,
            batch=settings.prewarm_batch,
            max_in_flight=settings.prewarm_max_in_flight,
            max_warm_age=settings.pool_max_warm_age_seconds,
            region_max_booting=settings.limits.region_max_booting,
            region_pool_budget_vms=settings.limits.region_pool_budget_vms,
        ),
        enqueue=runtime.queue.enqueue,
        clock=runtime.clock,
        claim_is_live=claim_is_live,
        drained_regions=lambda: runtime.regions.state.drained_regions(settings.regions),
        sessions_booting=lambda region: runtime.sessions.live_counts([region], [])[region].booting,
    )


@labvirt_task(PREWARM)
def prewarm(task: Task, _payload: dict[str, str]) -> dict[str, Any]:
    prewarmer = build_prewarmer(runtime_of(task.app))
    if prewarmer is None:
        return {"pools": 0}
    ticks = prewarmer.tick()
    return {
        "pools": len(ticks),
        "created": sum(t.created for t in ticks),
        "retired": sum(t.retired for t in ticks),
        "skipped": sum(1 for t in ticks if t.skipped),
    }
