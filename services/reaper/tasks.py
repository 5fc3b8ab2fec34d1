"""The reaper and the reconciler, as Celery tasks run by beat.

The reaper ends sessions whose deadlines passed, fails those that did not start in time, warns
those about to end and asks again for teardowns that went missing and for provisions whose
environment is still not created (lost with their worker): ``SessionLife.reap`` reads
only what is due (``ZRANGEBYSCORE ... LIMIT``) and settles each due session in one optimistic
transaction (its new state, its re-indexed deadlines and its progress event commit together,
for exactly one reaper). A reaper that dies before committing leaves the deadline in place for
the next tick; one that dies after committing but before enqueueing the teardown (or the
provision) is covered by the ``teardown`` (``provision``) deadline, which asks again later.

The reconciler compares each region's VMIs with Redis (``services.reaper.reconciler``).
"""

from __future__ import annotations

import random
from typing import Any

import structlog
from celery import Task

from services.reaper.reconciler import Reconciler
from shared.adapters.kube import KubeError
from shared.jobs import PROVISION, REAP, RECONCILE, labvirt_task
from shared.runtime import Runtime, runtime_of

log = structlog.get_logger(__name__)


def build_reconciler(runtime: Runtime) -> Reconciler:
    return Reconciler(
        life=runtime.life,
        templates=runtime.templates,
        cluster_for=runtime.kube().get,
        pools=runtime.pools,
        orphan_grace_seconds=runtime.settings.orphan_grace_seconds,
    )


@labvirt_task(REAP)
def reap(task: Task, _payload: dict[str, str]) -> dict[str, Any]:
    runtime = runtime_of(task.app)
    reaped = runtime.life.reap(batch=runtime.settings.reaper_batch, rng=random.Random())
    # A learner who closed the tab: every connection gone for the grace time.
    disconnected = runtime.life.close_disconnected(grace=runtime.settings.disconnect_grace_seconds)
    return {
        "teardowns": len(reaped.teardowns),
        "warnings": len(reaped.warnings),
        "provisions": len(reaped.provisions),
        "disconnected": len(disconnected),
    }


@labvirt_task(RECONCILE)
def reconcile(task: Task, _payload: dict[str, str]) -> dict[str, Any]:
    runtime = runtime_of(task.app)
    reconciler = runtime.service(Reconciler, build_reconciler)
    totals: dict[str, int] = {}
    for region in runtime.settings.regions:
        try:
            report = reconciler.reconcile(region, now=runtime.clock())
        except KubeError as exc:  # one unreachable cluster must not hold up the others
            log.warning("reconcile.region_failed", region=region, error=str(exc))
            totals["regions_failed"] = totals.get("regions_failed", 0) + 1
            continue
        for session_id in report.provisions:
            runtime.queue.enqueue(PROVISION, {"session_id": session_id})
        for key, value in report.counts().items():
            totals[key] = totals.get(key, 0) + value
    return totals
