"""Celery tasks of the warm pools' environments: thin adapters to ``PoolEnvironments``.

``labvirt.prewarm_environment``, ``labvirt.check_environment`` and
``labvirt.retire_environment`` run on the ``prewarm`` queue; ``labvirt.bind_environment`` on
``provision``, since a learner holds that environment. Every step is safe to repeat.
"""

from __future__ import annotations

from typing import Any

import structlog
from celery import Task

from services.provisioner.pool_environments import BindConflict
from services.provisioner.wiring import pool_environments_of
from shared.adapters.kube import KubeError
from shared.domain.pools.config import PoolKey
from shared.jobs import (
    BIND_ENVIRONMENT,
    CHECK_ENVIRONMENT,
    PREWARM_ENVIRONMENT,
    RETIRE_ENVIRONMENT,
    labvirt_task,
)

log = structlog.get_logger(__name__)


@labvirt_task(PREWARM_ENVIRONMENT)
def prewarm_environment(task: Task, payload: dict[str, str]) -> dict[str, Any]:
    environments = pool_environments_of(task.app)
    env_id = payload["environment_id"]
    try:
        work = environments.boot(env_id)
    except KubeError as exc:
        env = environments.environment(env_id)
        if env is None:
            raise
        work = environments.give_up(PoolKey(env.region, env.template), env, f"cluster error: {exc}")
    return {"detail": work.detail}


@labvirt_task(CHECK_ENVIRONMENT)
def check_environment(task: Task, payload: dict[str, str]) -> dict[str, Any]:
    return {"detail": pool_environments_of(task.app).check(payload["environment_id"]).detail}


@labvirt_task(RETIRE_ENVIRONMENT)
def retire_environment(task: Task, payload: dict[str, str]) -> dict[str, Any]:
    # On a cluster error the objects stay, labelled as labvirt's and owned by nobody: the
    # reconciler deletes them after its grace time.
    work = pool_environments_of(task.app).remove(payload["environment_id"], payload["region"])
    return {"detail": work.detail}


@labvirt_task(BIND_ENVIRONMENT)
def bind_environment(task: Task, payload: dict[str, str]) -> dict[str, Any]:
    environments = pool_environments_of(task.app)
    session_id = payload["session_id"]
    try:
        work = environments.bind(session_id)
    except (KubeError, BindConflict) as exc:
        environments.fail_bind(session_id, exc)
        raise
    return {"detail": work.detail}
