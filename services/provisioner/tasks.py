"""Celery tasks of the provisioner: thin adapters from a payload to the services.

Provision creates an environment and returns (the informer sees it boot); teardown deletes one
and returns. Both are safe to repeat, so a worker that dies mid-task leaves the message for
another (``acks_late``), which picks up where the cluster and Redis stand. Cluster calls share
the task's retry budget; a task whose budget runs out fails its session (provision) or leaves
the next try to the reaper's teardown deadline (teardown), never retrying on top, and then
fails: the task wrapper records it in the dead letters for an operator to requeue.
"""

from __future__ import annotations

from typing import Any

from celery import Task

from services.provisioner.environments import Outcome, Provisioner
from services.provisioner.wiring import provisioner_of
from shared.adapters.kube import KubeError
from shared.domain.reasons import Failure
from shared.jobs import PROVISION, TEARDOWN, labvirt_task


@labvirt_task(PROVISION)
def provision(task: Task, payload: dict[str, str]) -> dict[str, Any]:
    provisioner: Provisioner = provisioner_of(task.app)
    session_id = payload["session_id"]
    try:
        outcome = provisioner.provision(session_id)
    except KubeError as exc:
        # The learner is told at once; the failure itself goes to the dead letters.
        provisioner.fail(session_id, Failure.cluster_error(str(exc)))
        raise
    return _result(outcome)


@labvirt_task(TEARDOWN)
def teardown(task: Task, payload: dict[str, str]) -> dict[str, Any]:
    # On a cluster error the session stays terminating: the reaper asks for another teardown
    # later, and the failure is in the dead letters meanwhile.
    return _result(provisioner_of(task.app).teardown(payload["session_id"]))


def _result(outcome: Outcome) -> dict[str, Any]:
    return {"state": outcome.state.value if outcome.state else None, "detail": outcome.detail}
