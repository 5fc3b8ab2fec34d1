"""Warm pools on the cluster: boot a pooled environment, retire one, bind a claimed one.

- ``labvirt.prewarm_environment`` (queue ``prewarm``) creates the objects of a reserved
  environment with the token its pool record chose, follows them with the provisioner's
  list-then-watch until every VM is Running and Ready, and marks it ready in the pool. VMIs
  waiting for capacity flag the environment (the prewarmer then creates nothing more in the
  region) and, still waiting after ``UNSCHEDULABLE_GIVE_UP_SECONDS``, fail it.
- ``labvirt.retire_environment`` (queue ``prewarm``) deletes a retired one and waits until gone.
- ``labvirt.bind_environment`` (queue ``provision``: a learner holds it) relabels the VMIs of
  a claimed environment with its session: a merge patch carrying ``metadata.resourceVersion``,
  so a concurrent change makes it 409 and it reads again. VMIs gone or failed fail the session.

Every step is safe to repeat; the tasks are ``acks_late``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import structlog
from celery import Task, shared_task

from services.provisioner.environments import EnvironmentStuck, EnvironmentWatch, Provisioner
from services.provisioner.retrying import MAX_RETRIES, retry_or_give_up
from shared.adapters.kube import Conflict, KubeCluster, KubeError, NotFound
from shared.adapters.pool_store import PoolStore
from shared.adapters.session_store import RedisSessionStore, SessionNotFound
from shared.domain.manifests import (
    POOL_LABEL,
    SESSION_LABEL,
    build_environment,
    environment_selector,
    environment_vmi_name,
)
from shared.domain.pools import EnvironmentState, PoolKey, WarmEnvironment
from shared.domain.recovery import session_annotations
from shared.domain.sessions import IllegalTransition, Session, SessionState
from shared.domain.templates import Template
from shared.domain.vmi_status import failure_of, is_ready, vm_views
from shared.jobs import (
    BIND_ENVIRONMENT,
    PREWARM_ENVIRONMENT,
    PREWARM_QUEUE,
    RETIRE_ENVIRONMENT,
    TEARDOWN,
    TEARDOWN_QUEUE,
)
from shared.worker_runtime import WorkerRuntime, worker_runtime_of

log = structlog.get_logger(__name__)

UNSCHEDULABLE_GIVE_UP_SECONDS: Final = 30.0
UNSCHEDULABLE_REASON: Final = "no node has room for its VMs (Unschedulable)"
BIND_ATTEMPTS: Final = 5  # re-reads after a 409 within one task run, before a retry


class BindConflict(Exception):
    """The VMIs kept changing under the relabelling; the task tries again later."""


@dataclass(frozen=True)
class PoolOutcome:
    detail: str
    # Work for the caller to enqueue once the outcome is known.
    retire: bool = False  # delete the environment's objects
    teardown_session: str | None = None


def unschedulable(vmi: Mapping[str, Any]) -> bool:
    """The VMI's launcher pod fits on no node (``PodScheduled=False``, ``Unschedulable``)."""
    conditions = (vmi.get("status") or {}).get("conditions") or []
    return any(
        c.get("type") == "PodScheduled"
        and c.get("status") == "False"
        and c.get("reason") == "Unschedulable"
        for c in conditions
    )


@dataclass
class _Boot:
    """What one boot has seen so far (the watch's callbacks fill it in)."""

    expected: frozenset[str]
    failure: str | None = None
    retired: bool = False
    flagged: bool = False
    waiting_since: float | None = None
    started_waiting: bool = False


class PoolEnvironments:
    def __init__(
        self,
        *,
        pools: PoolStore,
        sessions: RedisSessionStore,
        templates: dict[str, Template],
        cluster_for: Callable[[str], KubeCluster],
        clock: Callable[[], float] = time.time,
        teardown_timeout: float = 120.0,
        unschedulable_patience: float = UNSCHEDULABLE_GIVE_UP_SECONDS,
    ) -> None:
        self._pools = pools
        self._unschedulable_patience = unschedulable_patience
        self._sessions = sessions
        self._templates = templates
        self._cluster_for = cluster_for
        self._clock = clock
        self._teardown_timeout = teardown_timeout

    # -- boot -------------------------------------------------------------------------------

    def boot(self, env_id: str) -> PoolOutcome:
        env = self._pools.environment(env_id)
        if env is None:
            return PoolOutcome("no such environment")
        if env.state is not EnvironmentState.BOOTING:
            return PoolOutcome(f"nothing to do: {env.state.value}")
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
        if manifests.service is not None:
            cluster.create_service(manifests.service)
        for vmi in manifests.vmis:
            cluster.create_vmi(vmi)
        log.info("pool.environment_created", vms=len(manifests.vmis))

        boot = _Boot(expected=frozenset(vmi["metadata"]["name"] for vmi in manifests.vmis))
        watch = EnvironmentWatch(cluster, environment_selector(env.id), clock=self._clock)
        deadline = env.created_at + template.startup_timeout_seconds
        while True:
            # While VMIs wait for room, wake up when the patience runs out, not at the next
            # event: a full cluster sends none.
            patience = (
                deadline
                if boot.waiting_since is None
                else min(deadline, boot.waiting_since + self._unschedulable_patience)
            )
            settled = watch.until(lambda vmis: self._settled(env, boot, vmis), deadline=patience)
            if boot.started_waiting:
                boot.started_waiting = False
                continue
            if settled or self._clock() >= deadline:
                break
            if boot.waiting_since is not None:
                boot.failure = UNSCHEDULABLE_REASON
                break
        if boot.retired:
            return PoolOutcome("retired while booting")
        if boot.failure is not None or not settled:
            reason = boot.failure or (
                f"not ready within {template.startup_timeout_seconds} s (startup timeout)"
            )
            return self.give_up(key, env, reason)
        now = self._clock()
        views = vm_views(template, watch.vmis.values())
        if not self._pools.mark_ready(key, env.id, vms=views, at=now):
            return PoolOutcome("retired while booting")
        self._pools.record_success(key, refill_seconds=now - env.created_at)
        log.info("pool.environment_ready", seconds=round(now - env.created_at, 2))
        return PoolOutcome("ready")

    def _settled(self, env: WarmEnvironment, boot: _Boot, vmis: dict[str, dict[str, Any]]) -> bool:
        for name in boot.expected:
            vmi = vmis.get(name)
            reason = failure_of(vmi) if vmi is not None else None
            if reason:
                boot.failure = reason
                return True
        current = self._pools.environment(env.id)
        if current is None or current.state is not EnvironmentState.BOOTING:
            boot.retired = True
            return True
        waiting = any(unschedulable(vmi) for vmi in vmis.values())
        if waiting != boot.flagged:
            self._pools.mark_unschedulable(env.id, unschedulable=waiting)
            boot.flagged = waiting
        if waiting:
            now = self._clock()
            if boot.waiting_since is None:
                boot.waiting_since = now
                boot.started_waiting = True
                return True  # watch again, with a deadline at the end of the patience
            if now - boot.waiting_since >= self._unschedulable_patience:
                boot.failure = UNSCHEDULABLE_REASON
                return True
        else:
            boot.waiting_since = None
        return boot.expected <= vmis.keys() and all(is_ready(vmis[n]) for n in boot.expected)

    def give_up(self, key: PoolKey, env: WarmEnvironment, reason: str) -> PoolOutcome:
        """A failed creation: out of the pool (the pool backs off) and off the cluster."""
        if not self._pools.retire(key, env.id):
            return PoolOutcome("retired while booting")
        self._pools.record_failure(key, at=self._clock())
        log.warning("pool.environment_failed", reason=reason)
        return PoolOutcome(f"failed: {reason}", retire=True)

    # -- retire -----------------------------------------------------------------------------

    def remove(self, env_id: str, region: str) -> PoolOutcome:
        """Delete the environment's objects and wait until its VMIs are gone."""
        provisioner = Provisioner(
            sessions=self._sessions,
            templates=self._templates,
            cluster_for=self._cluster_for,
            clock=self._clock,
            teardown_timeout=self._teardown_timeout,
        )
        provisioner.delete_environment(self._cluster_for(region), environment_selector(env_id))
        return PoolOutcome("removed")

    # -- bind -------------------------------------------------------------------------------

    def bind(self, session_id: str) -> PoolOutcome:
        session = self._sessions.get(session_id)
        if session is None:
            return PoolOutcome("no such session")
        if not session.warm:
            return PoolOutcome("not a warm session")
        key = PoolKey(session.region, session.template)
        if session.state is not SessionState.READY:
            # Closing or closed: its teardown removes the environment.
            self._pools.bound(key, session.environment_id)
            return PoolOutcome(f"nothing to do: {session.state.value}")
        template = self._templates.get(session.template)
        if template is None:
            return self.fail_session(session, f"template {session.template!r} is not configured")
        cluster = self._cluster_for(session.region)
        selector = environment_selector(session.environment_id)
        expected = {environment_vmi_name(session.environment_id, vm.name) for vm in template.vms}
        for _ in range(BIND_ATTEMPTS):
            vmis = {v["metadata"]["name"]: v for v in cluster.list_vmis(selector)[0]}
            problem = _bind_problem(session, expected, vmis)
            if problem is not None:
                return self.fail_session(session, problem)
            try:
                for name in sorted(expected):
                    vmis[name] = self._label(cluster, session, vmis[name])
            except (Conflict, NotFound):
                continue  # changed or gone meanwhile: read again
            self._record_views(session.id, template, vmis)
            self._pools.bound(key, session.environment_id)
            log.info("pool.environment_bound", environment_id=session.environment_id)
            return PoolOutcome("bound")
        raise BindConflict(f"VMIs of {selector} kept changing")

    @staticmethod
    def _label(cluster: KubeCluster, session: Session, vmi: dict[str, Any]) -> dict[str, Any]:
        metadata = vmi["metadata"]
        labels = metadata.get("labels") or {}
        if labels.get(SESSION_LABEL) == session.id and POOL_LABEL not in labels:
            return vmi
        patch = {
            "metadata": {
                # A precondition: the patch applies to this version or answers 409.
                "resourceVersion": metadata["resourceVersion"],
                # The VMI leaves the pool: ``labvirt.io/pool=<template>`` selects only VMIs
                # nobody holds.
                "labels": {SESSION_LABEL: session.id, POOL_LABEL: None},
                # What the reconciler needs to rebuild the session from the cluster.
                "annotations": session_annotations(session),
            }
        }
        return cluster.patch_vmi(metadata["name"], patch)

    def _record_views(
        self, session_id: str, template: Template, vmis: dict[str, dict[str, Any]]
    ) -> None:
        views = vm_views(template, vmis.values())

        def change(current: Session) -> Session:
            if current.state is not SessionState.READY or list(current.vms) == views:
                return current
            return current.with_vms(views)

        try:
            self._sessions.update(session_id, change)
        except SessionNotFound:
            return

    def fail_session(self, session: Session, reason: str) -> PoolOutcome:
        now = self._clock()
        self._pools.bound(PoolKey(session.region, session.template), session.environment_id)
        try:
            self._sessions.update(
                session.id, lambda s: s.transition(SessionState.FAILED, at=now, reason=reason)
            )
        except (IllegalTransition, SessionNotFound):
            return PoolOutcome(f"not failed: {reason}")
        log.warning("session.failed", reason=reason)
        return PoolOutcome(f"failed: {reason}", teardown_session=session.id)


def _bind_problem(
    session: Session, expected: set[str], vmis: Mapping[str, Mapping[str, Any]]
) -> str | None:
    """Why the claimed environment cannot serve the session, or None."""
    missing = sorted(expected - vmis.keys())
    if missing:
        return f"warm environment lost its VMs ({', '.join(missing)})"
    for name in sorted(expected):
        vmi = vmis[name]
        reason = failure_of(vmi)
        if reason is not None:
            return f"warm environment failed: {reason}"
        holder = (vmi["metadata"].get("labels") or {}).get(SESSION_LABEL)
        if holder not in (None, session.id):
            # Claims are exactly-once in Redis; this would mean the cluster disagrees.
            return f"VM {name} already belongs to session {holder}"
    return None


# -- Celery tasks ----------------------------------------------------------------------------


def _environments(runtime: WorkerRuntime) -> PoolEnvironments:
    if runtime.pools is None:
        raise RuntimeError("this worker runs without a pool store")
    return PoolEnvironments(
        pools=runtime.pools,
        sessions=runtime.sessions,
        templates=runtime.templates,
        cluster_for=runtime.clusters.get,
        clock=runtime.clock,
        teardown_timeout=runtime.settings.teardown_timeout_seconds,
    )


def _log_context(task: Task, **values: Any) -> None:
    structlog.contextvars.bind_contextvars(task_id=task.request.id, task=task.name, **values)


def _follow_up(runtime: WorkerRuntime, outcome: PoolOutcome, *, env_id: str, region: str) -> None:
    if outcome.retire:
        runtime.celery.send_task(RETIRE_ENVIRONMENT, args=[env_id, region], queue=PREWARM_QUEUE)
    if outcome.teardown_session is not None:
        runtime.celery.send_task(TEARDOWN, args=[outcome.teardown_session], queue=TEARDOWN_QUEUE)


@shared_task(bind=True, name=PREWARM_ENVIRONMENT, acks_late=True, max_retries=MAX_RETRIES)
def prewarm_environment(self: Task, env_id: str) -> dict[str, Any]:
    runtime = worker_runtime_of(self.app)
    environments = _environments(runtime)
    env = runtime.pools.environment(env_id) if runtime.pools else None
    region = env.region if env else ""
    _log_context(self, environment_id=env_id, template=env.template if env else None)
    try:
        outcome = environments.boot(env_id)
    except KubeError as exc:
        retry_or_give_up(self, exc, transient=exc.transient, what="pool.boot")
        if env is None:
            raise
        outcome = environments.give_up(
            PoolKey(env.region, env.template), env, f"cluster error: {exc}"
        )
    _follow_up(runtime, outcome, env_id=env_id, region=region)
    return {"detail": outcome.detail}


@shared_task(bind=True, name=RETIRE_ENVIRONMENT, acks_late=True, max_retries=MAX_RETRIES * 2)
def retire_environment(self: Task, env_id: str, region: str) -> dict[str, Any]:
    runtime = worker_runtime_of(self.app)
    _log_context(self, environment_id=env_id, region=region)
    try:
        outcome = _environments(runtime).remove(env_id, region)
    except (KubeError, EnvironmentStuck) as exc:
        transient = isinstance(exc, EnvironmentStuck) or exc.transient
        retry_or_give_up(self, exc, transient=transient, what="pool.retire")
        raise
    return {"detail": outcome.detail}


@shared_task(bind=True, name=BIND_ENVIRONMENT, acks_late=True, max_retries=MAX_RETRIES)
def bind_environment(self: Task, session_id: str) -> dict[str, Any]:
    runtime = worker_runtime_of(self.app)
    session = runtime.sessions.get(session_id)
    _log_context(
        self,
        session_id=session_id,
        template=session.template if session else None,
        environment_id=session.environment_id if session else None,
    )
    environments = _environments(runtime)
    try:
        outcome = environments.bind(session_id)
    except (KubeError, BindConflict) as exc:
        transient = isinstance(exc, BindConflict) or exc.transient
        retry_or_give_up(self, exc, transient=transient, what="pool.bind")
        if session is None:
            raise
        outcome = environments.fail_session(session, f"could not bind the warm environment: {exc}")
    if outcome.teardown_session is not None:
        runtime.celery.send_task(TEARDOWN, args=[outcome.teardown_session], queue=TEARDOWN_QUEUE)
    return {"detail": outcome.detail}
