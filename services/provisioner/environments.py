"""Bringing a session's environment up and down on its cluster, without waiting on it.

``provision`` creates the environment's objects and returns: its worker thread is free at once.
The region's informer (``services.provisioner.observer``) sees the VMs boot and marks the
session ready, or failed. ``teardown`` deletes the objects and returns; the session ends when
the informer sees the last VMI go (or at once, when nothing was left to delete).

Every step is safe to repeat: names are deterministic, 409 on create means "already there",
404 on delete means "already gone", and state changes go through ``SessionLife``, so a
redelivered task or a second worker does no harm. Once every object exists the session records
its environment created: until then the reaper asks for the provision again (a worker that
died holding it), and after it a provision asked again returns without calling the cluster.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from shared.adapters.kube import KubeCluster
from shared.adapters.session_store import SessionNotFound
from shared.domain.lifecycle import Stage
from shared.domain.manifests import (
    EnvironmentManifests,
    build_environment,
    environment_selector,
)
from shared.domain.reasons import Failure
from shared.domain.recovery import session_annotations
from shared.domain.retries import with_environment_created
from shared.domain.sessions import EnvironmentId, Session, SessionState
from shared.domain.templates import Template
from shared.metrics.series import series
from shared.session_life import SessionLife

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What a task did, for its result and its log line."""

    state: SessionState | None
    detail: str


def create_environment(cluster: KubeCluster, manifests: EnvironmentManifests) -> None:
    """Create an environment's objects; those already there count as created.

    The NetworkPolicy first, then the Service, then the VMIs: booting VMs find their peers
    reachable and resolvable (the namespace's fence denies VM-to-VM traffic without it).
    """
    if manifests.network_policy is not None:
        cluster.create_network_policy(manifests.network_policy)
    if manifests.service is not None:
        cluster.create_service(manifests.service)
    for vmi in manifests.vmis:
        cluster.create_vmi(vmi)


def delete_environment(cluster: KubeCluster, environment_id: str) -> int:
    """Ask for every object of the environment to go; the number of VMIs still there.

    VMIs keep a finalizer while their guest shuts down, so they may outlive the call by a
    moment: the informer sees them go.
    """
    selector = environment_selector(environment_id)
    # The VMIs last: they are what a retried teardown and the reconciler's sweep find.
    cluster.delete_network_policies(selector)
    cluster.delete_services(selector)
    cluster.delete_vmis(selector)
    remaining, _ = cluster.list_vmis(selector)
    return len(remaining)


class Provisioner:
    def __init__(
        self,
        *,
        life: SessionLife,
        templates: dict[str, Template],
        cluster_for: Callable[[str], KubeCluster],
    ) -> None:
        self._life = life
        self._templates = templates
        self._cluster_for = cluster_for

    def provision(self, session_id: str) -> Outcome:
        """Create the environment of a provisioning session; its readiness is observed."""
        session = self._life.get(session_id)
        if session is None:
            return Outcome(None, "no such session")
        if session.state is not SessionState.PROVISIONING:
            return Outcome(session.state, "nothing to do")
        if session.environment_created:  # asked again while the first one succeeded
            return Outcome(session.state, "already created")
        template = self._templates.get(session.template)
        if template is None:
            self._life.fail(session.id, Failure.template_missing(session.template))
            return Outcome(SessionState.FAILED, "template missing")
        cluster = self._cluster_for(session.region)
        manifests = build_environment(
            template=template,
            environment_id=session.environment_id,
            namespace=cluster.namespace,
            session_id=session.id,
            # Chosen at open and stored with the session: a retry renders the same manifests.
            environment_token=session.environment_token,
            # What the reconciler needs to rebuild the session should Redis lose it.
            extra_annotations=session_annotations(session),
        )
        self._life.emit(session.id, Stage.CREATING, {"vms": len(manifests.vmis)})
        started = time.perf_counter()
        create_environment(cluster, manifests)
        series().provisioning_duration.labels(
            template=session.template, region=session.region
        ).observe(time.perf_counter() - started)
        log.info("environment.created", vms=len(manifests.vmis), region=session.region)
        current = self._record_created(session_id, session.environment_id)
        if current is None or current.state is not SessionState.PROVISIONING:
            # Closed while the objects were created: its teardown may have run before them.
            delete_environment(cluster, session.environment_id)
            return Outcome(current.state if current else None, "closed while creating")
        return Outcome(SessionState.PROVISIONING, "created")

    def _record_created(self, session_id: str, environment_id: EnvironmentId) -> Session | None:
        """The session once it knows ``environment_id`` is created (None: it is gone)."""
        try:
            return self._life.store.update(
                session_id, lambda s: with_environment_created(s, environment_id=environment_id)
            )
        except SessionNotFound:
            return None

    def fail(self, session_id: str, failure: Failure) -> Outcome:
        """Give up on a session whose environment cannot be made (and remove what was)."""
        failed = self._life.fail(session_id, failure)
        return Outcome(SessionState.FAILED if failed else None, failure.message)

    def teardown(self, session_id: str) -> Outcome:
        """Remove a closing (or failed) session's environment."""
        session = self._life.closing_for_teardown(session_id)
        if session is None:
            return Outcome(None, "no such session")
        if session.state is SessionState.ENDED:
            return Outcome(session.state, "nothing to do")
        remaining = delete_environment(self._cluster_for(session.region), session.environment_id)
        if remaining:
            log.info("environment.deleting", vmis=remaining)
            return Outcome(session.state, f"deleting {remaining} VMI(s)")
        if session.state is SessionState.FAILED:
            log.info("environment.removed", state="failed")
            return Outcome(SessionState.FAILED, "resources removed")
        self._life.finish(session_id)
        return Outcome(SessionState.ENDED, "ended")
