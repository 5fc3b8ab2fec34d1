"""Starting Celery worker and beat processes with labvirt's runtime attached."""

from __future__ import annotations

from typing import Any

import structlog
from celery.signals import task_postrun, task_prerun

from shared.config import Settings
from shared.jobs import QUEUES, make_celery
from shared.runtime import attach_runtime
from shared.worker_runtime import build_worker_runtime


def _bind_task(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    structlog.contextvars.bind_contextvars(task_id=task_id, task=getattr(task, "name", None))


def _clear_task(**_: Any) -> None:
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(process="worker")


def start_worker(settings: Settings, *, queues: str | None, name: str) -> None:
    app = make_celery(settings)
    attach_runtime(app, build_worker_runtime(settings, celery=app))
    task_prerun.connect(_bind_task, weak=False)
    task_postrun.connect(_clear_task, weak=False)
    app.worker_main(
        [
            "worker",
            f"--loglevel={settings.log_level}",
            # Provisioning waits on VM boots: threads, not processes, so one worker holds many.
            "--pool=threads",
            f"--concurrency={settings.worker_concurrency}",
            f"--queues={queues or ','.join(QUEUES)}",
            f"--hostname={name}",
            "--without-gossip",
            "--without-mingle",
        ]
    )


def start_beat(settings: Settings) -> None:
    app = make_celery(settings)
    app.start(
        [
            "beat",
            f"--loglevel={settings.log_level}",
            # Schedules are code, not state: nothing to persist between restarts.
            "--scheduler=celery.beat:Scheduler",
        ]
    )
