"""The worker's and beat's wiring functions: one Celery app, one runtime, services built once.

A worker builds its runtime (Redis, one Kubernetes client per region), the services its tasks
share, and the region informers that follow labvirt's VMIs, then takes tasks. Beat only
schedules: it needs the Celery app and nothing else.

With ``LABVIRT_WORKER_POOL=prefork`` the tasks run in child processes. The informers stay in
the parent; each child builds its own runtime when it starts (``worker_process_init``), so it
uses none of the parent's Redis or Kubernetes connections. A child that dies mid-task (SIGKILL, an
OOM kill) has its task handed back to the queue at once (``reject_on_worker_lost``), and the
pool starts a new child.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import structlog
from celery import Celery
from celery.signals import task_postrun, task_prerun, worker_process_init, worker_shutdown

from services.provisioner import wiring as provisioner_wiring
from services.reaper.reconciler import Reconciler
from services.reaper.tasks import build_reconciler
from shared.adapters.clusters import Clusters
from shared.adapters.template_files import load_templates
from shared.config import Settings
from shared.jobs import PREWARM_QUEUE, PROVISION_QUEUE, QUEUES, make_celery
from shared.metrics.server import start_metrics_server
from shared.runtime import Runtime, attach_runtime, build_runtime, check_startup

log = structlog.get_logger(__name__)


def _bind_task(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    structlog.contextvars.bind_contextvars(task_id=task_id, task=getattr(task, "name", None))


# What this process's log lines say it is: "worker", or "worker-child" in a prefork child.
_process_name = ["worker"]


def _clear_task(**_: Any) -> None:
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(process=_process_name[0])


def wire_worker(settings: Settings, *, queues: list[str]) -> tuple[Celery, Runtime]:
    """The worker's Celery app with its runtime and services; informers started."""
    app = make_celery(settings)
    runtime = build_runtime(settings, celery=app, clusters=Clusters(settings))
    check_startup(settings, app, runtime.templates)
    attach_runtime(app, runtime)
    runtime.service(Reconciler, build_reconciler)
    informers = provisioner_wiring.wire(
        runtime,
        follow_sessions=PROVISION_QUEUE in queues,
        follow_pools=PREWARM_QUEUE in queues,
    )
    log.info("worker.wired", queues=queues, informers=[i.region for i in informers])

    def stop_informers(**_: Any) -> None:
        for informer in informers:
            informer.stop(timeout=1.0)

    worker_shutdown.connect(stop_informers, weak=False)
    return app, runtime


# The parent's runtime, kept alive in a child: collecting it there would close the parent's
# connections' file descriptors from the child (redis-py shuts sockets down only in the process
# that opened them, but nothing here should depend on that).
_INHERITED: list[Runtime] = []


def _own_runtime(app: Celery, settings: Settings, inherited: Runtime, **_: Any) -> None:
    """In a prefork child, before its first task: a runtime of its own, no informers."""
    _INHERITED.append(inherited)
    runtime = build_runtime(settings, celery=app, clusters=Clusters(settings))
    attach_runtime(app, runtime)
    runtime.service(Reconciler, build_reconciler)
    _process_name[0] = "worker-child"
    structlog.contextvars.bind_contextvars(process="worker-child")
    log.info("worker.child_wired")


def start_worker(settings: Settings, *, queues: str | None, name: str) -> None:
    chosen = [q for q in (queues or ",".join(QUEUES)).split(",") if q]
    # First: a port it cannot listen on stops the worker before its informers start.
    start_metrics_server(settings)
    app, runtime = wire_worker(settings, queues=chosen)
    if settings.worker_pool == "prefork":
        worker_process_init.connect(partial(_own_runtime, app, settings, runtime), weak=False)
    task_prerun.connect(_bind_task, weak=False)
    task_postrun.connect(_clear_task, weak=False)
    app.worker_main(
        [
            "worker",
            f"--loglevel={settings.log_level}",
            # Tasks are short (create, delete, patch) and wait on the cluster's answers:
            # threads by default. Waiting on boots holds no thread (the informers do it).
            f"--pool={settings.worker_pool}",
            f"--concurrency={settings.worker_concurrency}",
            f"--queues={','.join(chosen)}",
            f"--hostname={name}",
            "--without-gossip",
            "--without-mingle",
        ]
    )


def start_beat(settings: Settings) -> None:
    app = make_celery(settings)
    check_startup(settings, app, load_templates(settings.templates_path))
    start_metrics_server(settings)
    app.start(
        [
            "beat",
            f"--loglevel={settings.log_level}",
            # Schedules are code, not state: nothing to persist between restarts.
            "--scheduler=celery.beat:Scheduler",
        ]
    )
