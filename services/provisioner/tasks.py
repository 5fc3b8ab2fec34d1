"""Celery tasks of the provisioner: thin adapters from a payload to the services.

Provision creates an environment and returns (the informer sees it boot); teardown deletes one
and returns. Both are safe to repeat, so a worker that dies mid-task leaves the message for
another (``acks_late``), which picks up where the cluster and Redis stand. Cluster calls share
the task's retry budget; a task whose budget runs out fails its session (provision) or leaves
the next try to the reaper's teardown deadline (teardown), never retrying on top.
"""

from __future__ import annotations

from typing import Any

import structlog
from celery import Task

from services.provisioner.environments import Outcome, Provisioner
from services.provisioner.wiring import provisioner_of
from shared.adapters.kube import KubeError
from shared.domain.reasons import Failure
from shared.jobs import PROVISION, TEARDOWN, labvirt_task

log = structlog.get_logger(__name__)


@labvirt_task(PROVISION)
def provision(task: Task, payload: dict[str, str]) -> dict[str, Any]:
    provisioner: Provisioner = provisioner_of(task.app)
    session_id = payload["session_id"]
    try:
        outcome = provisioner.provision(session_id)
    except KubeError as exc:
        log.warning("provision.gave_up", error=str(exc), transient=exc.transient)
        outcome = provisioner.fail(session_id, Failure.cluster_error(str(exc)))
    return _result(outcome)


@labvirt_task(TEARDOWN)
def teardown(task: Task, payload: dict[str, str]) -> dict[str, Any]:
    try:
        outcome = provisioner_of(task.app).teardown(payload["session_id"])
    except KubeError as exc:
        # The session stays terminating; the reaper asks for another teardown later.
        log.warning("teardown.gave_up", error=str(exc), transient=exc.transient)
        return {"state": None, "detail": f"gave up: {exc}"}
    return _result(outcome)


def _result(outcome: Outcome) -> dict[str, Any]:
    return {"state": outcome.state.value if outcome.state else None, "detail": outcome.detail}
