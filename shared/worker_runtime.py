"""A worker's runtime: the shared one plus the Kubernetes clusters, one client per region."""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery

from shared.adapters.clusters import Clusters
from shared.config import Settings
from shared.runtime import Runtime, build_runtime, runtime_of


@dataclass(kw_only=True)
class WorkerRuntime(Runtime):
    clusters: Clusters


def build_worker_runtime(settings: Settings, *, celery: Celery) -> WorkerRuntime:
    base = build_runtime(settings, celery=celery)
    return WorkerRuntime(
        settings=base.settings,
        redis=base.redis,
        sessions=base.sessions,
        templates=base.templates,
        celery=base.celery,
        clock=base.clock,
        pools=base.pools,
        clusters=Clusters(settings),
    )


def worker_runtime_of(app: Celery) -> WorkerRuntime:
    runtime = runtime_of(app)
    if not isinstance(runtime, WorkerRuntime):
        raise RuntimeError("this Celery app was not started by `labvirt worker`")
    return runtime
