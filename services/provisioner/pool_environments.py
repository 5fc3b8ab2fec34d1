"""Warm pools on the cluster: boot a pooled environment, retire one, bind a claimed one.

- ``boot`` creates the objects of a reserved environment with the token its pool record chose
  and returns. The region's informer reports its VMIs (``observe``): all Running and Ready marks
  it ready in the pool; a failed VM gives it up; VMs waiting for node room flag it (the
  prewarmer then creates nothing more in the region) and queue ``check`` for when the patience
  runs out, which gives it up if they still wait.
- ``remove`` deletes a retired environment's objects.
- ``bind`` relabels the VMIs of a claimed environment with its session: a merge patch carrying
  ``metadata.resourceVersion``, so a concurrent change makes it 409 and it reads again. VMIs
  gone or failed fail the session.

Every step is safe to repeat.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import structlog

from services.provisioner.environments import create_environment, delete_environment
from shared.adapters.informer import EnvironmentChange
from shared.adapters.kube import Conflict, KubeCluster, NotFound
from shared.adapters.pool_store import PoolStore
from shared.domain.manifests import (
    POOL_LABEL,
    SESSION_LABEL,
    build_environment,
    environment_selector,
    environment_vmi_name,
)
from shared.domain.pools.config import PoolKey
from shared.domain.pools.environments import EnvironmentState, WarmEnvironment
from shared.domain.reasons import Failure
from shared.domain.recovery import session_annotations
from shared.domain.sessions import Session, SessionState
from shared.domain.templates import Template
from shared.domain.vmi import Vmi, as_vmi, vmi_name
from shared.domain.vmi_status import (
    failure_of,
    is_ready,
    is_unschedulable,
    vm_views,
    warm_environment_problem,
)
from shared.jobs import CHECK_ENVIRONMENT, RETIRE_ENVIRONMENT, TaskQueue
from shared.session_life import SessionLife

log = structlog.get_logger(__name__)

UNSCHEDULABLE_GIVE_UP_SECONDS: Final = 30.0
UNSCHEDULABLE_REASON: Final = "no node has room for its VMs (Unschedulable)"
BIND_ATTEMPTS: Final = 5  # re-reads after a 409 within one task run


class BindConflict(Exception):
    """The VMIs kept changing under the relabelling."""


@dataclass(frozen=True)
class PoolWork:
    """What a pool task did, for its result and its log line."""

    detail: str


class PoolEnvironments:
    def __init__(
        self,
        *,
        pools: PoolStore,
        life: SessionLife,
        queue: TaskQueue,
        templates: dict[str, Template],
        cluster_for: Callable[[str], KubeCluster],
        clock: Callable[[], float] = time.time,
        unschedulable_patience: float = UNSCHEDULABLE_GIVE_UP_SECONDS,
    ) -> None:
        self._pools = pools
        self._life = life
        self._queue = queue
        self._templates = templates
        self._cluster_for = cluster_for
        self._clock = clock
        self._unschedulable_patience = unschedulable_patience

    def environment(self, env_id: str) -> WarmEnvironment | None:
        return self._pools.environment(env_id)

    # -- boot -------------------------------------------------------------------------------

    def boot(self, env_id: str) -> PoolWork:
        env = self._pools.environment(env_id)
        if env is None:
            return PoolWork("no such environment")
        if env.state is not EnvironmentState.BOOTING:
            return PoolWork(f"nothing to do: {env.state.value}")
        key = PoolKey(env.region, env.template)
        template = self._templates.get(env.template)
        if template is None:
            return self.give_up(key, env, f"template {env.template!r} is not configured")
        cluster = self._cluster_for(env.region)
        manifests = build_environment(
            template=template,
            environment_id=env.id,
            namespace=cluster.namespace,
            session_id=None,
            environment_token=env.token,
            extra_labels={POOL_LABEL: template.name},
            created_at=datetime.fromtimestamp(env.created_at, UTC),
        )
        create_environment(cluster, manifests)
        log.info("pool.environment_created", vms=len(manifests.vmis))
        return PoolWork("created")

    def observe(self, change: EnvironmentChange) -> None:
        """A pooled environment's VMIs changed: ready, failed, or waiting for room."""
        env = self._pools.environment(change.environment_id)
        if env is None or env.state is not EnvironmentState.BOOTING:
            return
        key = PoolKey(env.region, env.template)
        template = self._templates.get(env.template)
        if template is None:
            return
        for vmi in change.vmis:
            problem = failure_of(vmi)
            if problem is not None:
                self.give_up(key, env, problem)
                return
        waiting = any(is_unschedulable(vmi) for vmi in change.vmis)
        if waiting != env.unschedulable:
            self._pools.mark_unschedulable(env.id, unschedulable=waiting)
            if waiting:
                self._queue.enqueue(
                    CHECK_ENVIRONMENT,
                    {"environment_id": env.id},
                    delay=self._unschedulable_patience,
                )
        expected = {environment_vmi_name(env.id, vm.name) for vm in template.vms}
        present = {vmi_name(vmi): vmi for vmi in change.vmis}
        if expected <= present.keys() and all(is_ready(present[n]) for n in expected):
            now = self._clock()
            views = vm_views(template, change.vmis)
            if self._pools.mark_ready(key, env.id, vms=views, at=now):
                self._pools.record_success(key, refill_seconds=now - env.created_at)
                log.info(
                    "pool.environment_ready",
                    environment_id=env.id,
                    seconds=round(now - env.created_at, 2),
                )

    def check(self, env_id: str) -> PoolWork:
        """Give up an environment whose VMs still wait for node room after the patience."""
        env = self._pools.environment(env_id)
        if env is None or env.state is not EnvironmentState.BOOTING:
            return PoolWork("nothing to do")
        if not env.unschedulable:
            return PoolWork("found room")
        return self.give_up(PoolKey(env.region, env.template), env, UNSCHEDULABLE_REASON)

    def give_up(self, key: PoolKey, env: WarmEnvironment, reason: str) -> PoolWork:
        """A failed creation: out of the pool (the pool backs off) and off the cluster."""
        if not self._pools.retire(key, env.id):
            return PoolWork("retired meanwhile")
        self._pools.record_failure(key, at=self._clock())
        log.warning("pool.environment_failed", environment_id=env.id, reason=reason)
        self._queue.enqueue(RETIRE_ENVIRONMENT, {"environment_id": env.id, "region": env.region})
        return PoolWork(f"failed: {reason}")

    # -- retire -----------------------------------------------------------------------------

    def remove(self, env_id: str, region: str) -> PoolWork:
        remaining = delete_environment(self._cluster_for(region), env_id)
        return PoolWork(f"deleting {remaining} VMI(s)" if remaining else "removed")

    # -- bind -------------------------------------------------------------------------------

    def bind(self, session_id: str) -> PoolWork:
        session = self._life.get(session_id)
        if session is None:
            return PoolWork("no such session")
        if not session.warm:
            return PoolWork("not a warm session")
        key = PoolKey(session.region, session.template)
        if session.state is not SessionState.READY:
            # Closing or closed: its teardown removes the environment.
            self._pools.forget_claim(key, session.environment_id)
            return PoolWork(f"nothing to do: {session.state.value}")
        template = self._templates.get(session.template)
        if template is None:
            return self._fail(session, Failure.template_missing(session.template))
        cluster = self._cluster_for(session.region)
        selector = environment_selector(session.environment_id)
        expected = {environment_vmi_name(session.environment_id, vm.name) for vm in template.vms}
        for _ in range(BIND_ATTEMPTS):
            vmis = {vmi_name(v): v for v in cluster.list_vmis(selector)[0]}
            problem = warm_environment_problem(session.id, expected, vmis)
            if problem is not None:
                return self._fail(session, problem)
            try:
                for name in sorted(expected):
                    vmis[name] = self._label(cluster, session, vmis[name])
            except (Conflict, NotFound):
                continue  # changed or gone meanwhile: read again
            self._life.refresh_vms(session.id, vm_views(template, vmis.values()))
            self._pools.forget_claim(key, session.environment_id)
            log.info("pool.environment_bound", environment_id=session.environment_id)
            return PoolWork("bound")
        raise BindConflict(f"VMIs of {selector} kept changing")

    def fail_bind(self, session_id: str, error: Exception) -> PoolWork:
        """The bind could not be done: the session fails and its environment goes."""
        session = self._life.get(session_id)
        if session is None:
            return PoolWork("no such session")
        return self._fail(session, Failure.warm_environment_unbound(str(error)))

    def _fail(self, session: Session, failure: Failure) -> PoolWork:
        self._pools.forget_claim(PoolKey(session.region, session.template), session.environment_id)
        self._life.fail(session.id, failure)
        return PoolWork(f"failed: {failure.message}")

    @staticmethod
    def _label(cluster: KubeCluster, session: Session, vmi: Vmi) -> Vmi:
        metadata = vmi.get("metadata") or {}
        labels = metadata.get("labels") or {}
        if labels.get(SESSION_LABEL) == session.id and POOL_LABEL not in labels:
            return vmi
        patch = {
            "metadata": {
                # A precondition: the patch applies to this version or answers 409.
                "resourceVersion": metadata.get("resourceVersion"),
                # The VMI leaves the pool: ``labvirt.io/pool=<template>`` selects only VMIs
                # nobody holds.
                "labels": {SESSION_LABEL: session.id, POOL_LABEL: None},
                # What the reconciler needs to rebuild the session from the cluster.
                "annotations": session_annotations(session),
            }
        }
        return as_vmi(cluster.patch_vmi(vmi_name(vmi), patch))
