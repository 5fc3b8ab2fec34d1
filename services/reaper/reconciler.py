"""The reconciler: Redis says what should exist, the cluster says what does; make them agree.

Level-triggered and idempotent: each pass lists labvirt's VMIs in a region by label, compares
them with the sessions (and pools) Redis knows, and applies the difference. A second pass right
after the first finds nothing to do.

- A live session whose VMs vanished (once created), are being deleted or went ``Failed``
  becomes ``failed`` with a reason, and its environment is torn down. A provisioning session
  whose VMs are all ready is marked ready (the informer normally does it first; this catches
  what it missed). A provision lost with its worker is the reaper's to ask again (the session
  records when its environment is created; ``shared.domain.lifecycle``), not the reconciler's.
- A session whose document Redis lost (a flush, a restart without persistence) is rebuilt from
  its VMIs' labels and annotations (``shared.domain.recovery``); one that was still booting is
  provisioned again (idempotent: the VMIs exist, the watch picks them up).
- An environment no live session or pool owns, older than the grace time, is deleted.
- Annotations that changed in Redis (an extension's new ``expires-at``) are written back to the
  VMIs, so a rebuild restores the current deadline.

Sessions are read *before* the cluster is listed: a session that looks ready then had its VMIs
before the list was taken, so a VMI missing from the list really is gone. Ownership of what the
list shows is checked against a fresh read, so an environment created during the pass is never
taken for an orphan (the grace time covers the rest).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from shared.adapters.kube import KubeCluster
from shared.domain.manifests import (
    CREATED_AT_ANNOTATION,
    ENVIRONMENT_LABEL,
    MANAGED_BY_SELECTOR,
    POOL_LABEL,
    SESSION_LABEL,
    TEMPLATE_LABEL,
    environment_selector,
    environment_vmi_name,
    parse_timestamp,
)
from shared.domain.reasons import Failure
from shared.domain.recovery import restore_session, stale_annotations
from shared.domain.sessions import Session, SessionState
from shared.domain.templates import Template
from shared.domain.vmi import Vmi
from shared.domain.vmi_status import failure_of, is_ready, vm_views
from shared.metrics.series import series
from shared.session_life import SessionLife

log = structlog.get_logger(__name__)


class PoolOwnership(Protocol):
    """What the reconciler needs from the warm pools (``shared.adapters.pool_store``).

    Without one (a runtime with no pools), environments carrying the pool label are left
    alone: the reconciler does not delete what it cannot judge.
    """

    def owned_environment_ids(self, region: str) -> Collection[str]:
        """Ids of the environments the pools of ``region`` hold (booting or warm)."""
        ...

    def restore_environment(
        self, *, region: str, template: str, environment_id: str, created_at: float, ready: bool
    ) -> bool:
        """Take back a pool environment found in the cluster but not in Redis.

        True if the pool now owns it (the reconciler keeps it), False if the pool does not
        want it (the reconciler deletes it once it is older than the grace time).
        """
        ...


@dataclass
class Report:
    """What one pass did in one region."""

    region: str
    failed: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)
    pool_restored: list[str] = field(default_factory=list)
    orphans_deleted: list[str] = field(default_factory=list)
    annotated: list[str] = field(default_factory=list)
    provisions: list[str] = field(default_factory=list)
    made_ready: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            "failed": len(self.failed),
            "made_ready": len(self.made_ready),
            "restored": len(self.restored),
            "pool_restored": len(self.pool_restored),
            "orphans_deleted": len(self.orphans_deleted),
            "annotated": len(self.annotated),
        }

    @property
    def changed(self) -> bool:
        return any(self.counts().values())


@dataclass
class _Environment:
    """The VMIs of one environment, as listed."""

    environment_id: str | None
    vmis: list[Vmi]

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.vmis[0]["metadata"].get("labels") or {})

    @property
    def annotations(self) -> dict[str, str]:
        return dict(self.vmis[0]["metadata"].get("annotations") or {})

    @property
    def names(self) -> list[str]:
        return [vmi["metadata"]["name"] for vmi in self.vmis]

    @property
    def deleting(self) -> bool:
        return all(vmi["metadata"].get("deletionTimestamp") for vmi in self.vmis)

    def created_at(self) -> float | None:
        """When the youngest VMI was created (the grace time runs from there)."""
        times = []
        for vmi in self.vmis:
            stamp = vmi["metadata"].get("creationTimestamp")
            if not stamp:
                return None
            times.append(_parse_time(stamp))
        return max(times)


@dataclass
class _Pass:
    """One pass over one region: what it read and what it did."""

    region: str
    now: float
    cluster: KubeCluster
    known: dict[str, Session]
    pool_owned: Collection[str] | None
    report: Report


class Reconciler:
    def __init__(
        self,
        *,
        life: SessionLife,
        templates: dict[str, Template],
        cluster_for: Callable[[str], KubeCluster],
        pools: PoolOwnership | None = None,
        orphan_grace_seconds: float = 120.0,
    ) -> None:
        self._life = life
        self._sessions = life.store
        self._templates = templates
        self._cluster_for = cluster_for
        self._pools = pools
        self._grace = orphan_grace_seconds

    def reconcile(self, region: str, *, now: float) -> Report:
        known = self._sessions.region_sessions(region)  # before the list: see the module doc
        cluster = self._cluster_for(region)
        vmis, _ = cluster.list_vmis(MANAGED_BY_SELECTOR)
        environments = _group(vmis)
        by_environment = {e.environment_id: e for e in environments if e.environment_id}
        pool_owned = None if self._pools is None else set(self._pools.owned_environment_ids(region))
        run = _Pass(region, now, cluster, known, pool_owned, Report(region))

        for session in known.values():
            self._check_session(run, session, by_environment.get(session.environment_id))
        for environment in environments:
            if not self._owned(run, environment):
                self._delete_if_old(run, environment)

        if run.report.changed:
            log.info("reconcile.pass", region=region, **run.report.counts())
        return run.report

    # -- sessions Redis knows --------------------------------------------------------------

    def _check_session(
        self, run: _Pass, session: Session, environment: _Environment | None
    ) -> None:
        if not session.is_live:
            return  # terminating: the teardown (and the reaper's retry) owns it
        vmis = environment.vmis if environment is not None else []
        problem = self._problem(session, vmis)
        if problem is not None:
            if self._life.fail(session.id, problem):
                run.report.failed.append(session.id)
            return
        if session.state is SessionState.PROVISIONING and self._all_ready(session, vmis):
            template = self._templates[session.template]
            if self._life.mark_ready(session.id, vm_views(template, vmis)):
                run.report.made_ready.append(session.id)
            return
        for vmi in vmis:
            patch = stale_annotations(vmi["metadata"].get("annotations") or {}, session)
            if patch:
                name = vmi["metadata"]["name"]
                run.cluster.patch_vmi(name, {"metadata": {"annotations": patch}})
                run.report.annotated.append(name)

    def _all_ready(self, session: Session, vmis: list[Vmi]) -> bool:
        if session.template not in self._templates:
            return False
        names = {vmi["metadata"]["name"] for vmi in vmis}
        return all(name in names for name in self._expected_vmis(session)) and all(
            is_ready(vmi) for vmi in vmis
        )

    def _problem(self, session: Session, vmis: list[Vmi]) -> Failure | None:
        """Why a live session's environment can no longer serve it, or None."""
        by_name = {vmi["metadata"]["name"]: vmi for vmi in vmis}
        for vmi in by_name.values():
            failure = failure_of(vmi)  # Failed, Succeeded (shut down) or being deleted
            if failure is not None:
                return Failure.vm_failed(failure)
        if session.state is not SessionState.READY and not session.environment_created:
            return None  # still being created (or asked again by the reaper): VMIs may not exist
        for name in self._expected_vmis(session):
            if name not in by_name:
                return Failure.vm_vanished(name)
        return None

    def _expected_vmis(self, session: Session) -> list[str]:
        template = self._templates.get(session.template)
        names = [vm.name for vm in template.vms] if template else [vm.name for vm in session.vms]
        return [environment_vmi_name(session.environment_id, name) for name in names]

    # -- what the cluster shows ------------------------------------------------------------

    def _owned(self, run: _Pass, environment: _Environment) -> bool:
        labels = environment.labels
        session_id = labels.get(SESSION_LABEL)
        if session_id:
            session = run.known.get(session_id) or self._sessions.get(session_id)
            if session is not None:
                return not session.is_final
            return self._restore(run, environment)
        if POOL_LABEL in labels and environment.environment_id:
            if self._pools is None or run.pool_owned is None:
                return True  # no pool store to ask: leave it to the pools side
            if environment.environment_id in run.pool_owned:
                return True
            restored = self._pools.restore_environment(
                region=run.region,
                template=labels.get(TEMPLATE_LABEL, labels[POOL_LABEL]),
                environment_id=environment.environment_id,
                created_at=self._created_at(environment) or run.now,
                ready=all(is_ready(vmi) for vmi in environment.vmis),
            )
            if restored:
                run.report.pool_restored.append(environment.environment_id)
            return restored
        return False

    def _restore(self, run: _Pass, environment: _Environment) -> bool:
        labels = environment.labels
        template = self._templates.get(labels.get(TEMPLATE_LABEL, ""))
        if template is None or environment.deleting:
            return False
        views = vm_views(template, environment.vmis)
        complete = len(environment.vmis) == len(template.vms)
        session = restore_session(
            labels=labels,
            annotations=environment.annotations,
            region=run.region,
            vms=views,
            all_ready=complete and all(view.ready for view in views),
            now=run.now,
        )
        if session is None:
            return False
        if self._life.restore(session):
            run.report.restored.append(session.id)
            if session.state is SessionState.PROVISIONING:
                run.report.provisions.append(session.id)
            return True
        current = self._sessions.get(session.id)
        return current is not None and not current.is_final

    def _delete_if_old(self, run: _Pass, environment: _Environment) -> None:
        if environment.deleting:
            return  # already on its way out
        created = environment.created_at()
        if created is None or run.now - created < self._grace:
            return
        if environment.environment_id:
            selector = environment_selector(environment.environment_id)
            # The VMIs last: while they remain, the next pass finds the environment again.
            run.cluster.delete_network_policies(selector)
            run.cluster.delete_services(selector)
            run.cluster.delete_vmis(selector)
        else:
            for name in environment.names:
                run.cluster.delete_vmi(name)
        run.report.orphans_deleted.extend(environment.names)
        series().orphans_deleted.labels(region=run.region).inc()
        log.info(
            "reconcile.orphan_deleted",
            region=run.region,
            environment_id=environment.environment_id,
            vmis=environment.names,
            age_seconds=round(run.now - created, 1),
        )

    @staticmethod
    def _created_at(environment: _Environment) -> float | None:
        stamp = environment.annotations.get(CREATED_AT_ANNOTATION)
        if stamp:
            try:
                return _parse_time(stamp)
            except ValueError:
                pass
        return environment.created_at()


def _group(vmis: list[Vmi]) -> list[_Environment]:
    """VMIs by environment; one that lacks the environment label stands alone."""
    grouped: dict[str, _Environment] = {}
    alone: list[_Environment] = []
    for vmi in vmis:
        environment_id = (vmi["metadata"].get("labels") or {}).get(ENVIRONMENT_LABEL)
        if not environment_id:
            alone.append(_Environment(None, [vmi]))
            continue
        grouped.setdefault(environment_id, _Environment(environment_id, [])).vmis.append(vmi)
    return [*grouped.values(), *alone]


def _parse_time(stamp: str) -> float:
    return parse_timestamp(stamp).timestamp()
