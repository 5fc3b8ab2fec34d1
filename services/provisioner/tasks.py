"""Celery tasks of the provisioner: thin adapters from a session id to ``Provisioner``.

Both tasks are idempotent, so they are ``acks_late``: a worker that dies mid-task leaves the
message on the queue for another worker, which picks up where the cluster and Redis stand.
"""

from __future__ import annotations

from typing import Any

import structlog
from celery import Task, shared_task

from services.provisioner.environments import EnvironmentStuck, Provisioner
from services.provisioner.retrying import MAX_RETRIES, retry_or_give_up
from shared.adapters.kube import KubeError
from shared.domain.sessions import SessionState
from shared.jobs import PROVISION, TEARDOWN, TEARDOWN_QUEUE
from shared.worker_runtime import WorkerRuntime, worker_runtime_of

log = structlog.get_logger(__name__)


def _provisioner(runtime: WorkerRuntime) -> Provisioner:
    return Provisioner(
        sessions=runtime.sessions,
        templates=runtime.templates,
        cluster_for=runtime.clusters.get,
        clock=runtime.clock,
        teardown_timeout=runtime.settings.teardown_timeout_seconds,
        events=runtime.events,
    )


def _bind(task: Task, session_id: str, runtime: WorkerRuntime) -> None:
    session = runtime.sessions.get(session_id)
    structlog.contextvars.bind_contextvars(
        session_id=session_id,
        template=session.template if session else None,
        task_id=task.request.id,
        task=task.name,
    )


@shared_task(bind=True, name=PROVISION, acks_late=True, max_retries=MAX_RETRIES)
def provision(self: Task, session_id: str) -> dict[str, Any]:
    runtime = worker_runtime_of(self.app)
    _bind(self, session_id, runtime)
    try:
        outcome = _provisioner(runtime).provision(session_id)
    except KubeError as exc:
        retry_or_give_up(self, exc, transient=exc.transient, what="provision")
        outcome = _provisioner(runtime).fail(session_id, f"cluster error: {exc}")
    if outcome.state is SessionState.FAILED:
        runtime.celery.send_task(TEARDOWN, args=[session_id], queue=TEARDOWN_QUEUE)
    return {"state": outcome.state.value if outcome.state else None, "detail": outcome.detail}


@shared_task(bind=True, name=TEARDOWN, acks_late=True, max_retries=MAX_RETRIES * 2)
def teardown(self: Task, session_id: str) -> dict[str, Any]:
    runtime = worker_runtime_of(self.app)
    _bind(self, session_id, runtime)
    try:
        outcome = _provisioner(runtime).teardown(session_id)
    except (KubeError, EnvironmentStuck) as exc:
        transient = isinstance(exc, EnvironmentStuck) or exc.transient
        retry_or_give_up(self, exc, transient=transient, what="teardown")
        raise
    return {"state": outcome.state.value if outcome.state else None, "detail": outcome.detail}
