"""``labvirt.prewarm``: beat's tick of the warm pools; a thin adapter around ``Prewarmer``.

The tick talks to Redis only. Booting and retiring environments are the provisioner's tasks,
enqueued by name on the ``prewarm`` queue that a worker of its own consumes, so learners'
provisioning never waits behind them.
"""

from __future__ import annotations

from typing import Any

import structlog
from celery import Task, shared_task

from services.prewarmer.reconcile import Prewarmer, PrewarmSettings
from shared.domain.pools import WarmEnvironment
from shared.jobs import (
    BIND_ENVIRONMENT,
    PREWARM,
    PREWARM_ENVIRONMENT,
    PREWARM_QUEUE,
    PROVISION_QUEUE,
    RETIRE_ENVIRONMENT,
)
from shared.runtime import Runtime, runtime_of

log = structlog.get_logger(__name__)

_QUEUES = {
    PREWARM_ENVIRONMENT: PREWARM_QUEUE,
    RETIRE_ENVIRONMENT: PREWARM_QUEUE,
    BIND_ENVIRONMENT: PROVISION_QUEUE,
}


def prewarmer_for(runtime: Runtime) -> Prewarmer | None:
    """The runtime's prewarmer; None when the runtime has no pool store."""
    if runtime.pools is None:
        return None
    settings = runtime.settings

    def enqueue(name: str, args: list[Any]) -> None:
        runtime.celery.send_task(name, args=args, queue=_QUEUES[name])

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
        ),
        enqueue=enqueue,
        clock=runtime.clock,
        claim_is_live=claim_is_live,
    )


@shared_task(bind=True, name=PREWARM, acks_late=True, ignore_result=True)
def prewarm(self: Task) -> dict[str, Any]:
    structlog.contextvars.bind_contextvars(task_id=self.request.id, task=self.name)
    prewarmer = prewarmer_for(runtime_of(self.app))
    if prewarmer is None:
        return {"pools": 0}
    outcomes = prewarmer.tick()
    return {
        "pools": len(outcomes),
        "created": sum(o.created for o in outcomes),
        "retired": sum(o.retired for o in outcomes),
        "skipped": sum(1 for o in outcomes if o.skipped),
    }
