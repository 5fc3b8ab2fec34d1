"""What a change of an environment's VMIs means, as the region's informer reports it.

One handler for every labvirt environment of a region, called by the process's informer
(``shared.adapters.informer``) whenever a VMI of the environment changes, and for every
environment after each list. It decides nothing itself: a session's environment goes to
``SessionLife`` (progress, ready, failed, finished), a pooled one to ``PoolEnvironments``.

A change that means nothing new (a label patch, a resourceVersion bump) is skipped by
comparing what labvirt reads of the VMIs with what it read last time.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Final

import structlog

from services.provisioner.pool_environments import PoolEnvironments
from shared.adapters.informer import EnvironmentChange
from shared.domain.manifests import POOL_LABEL, SESSION_LABEL, environment_vmi_name
from shared.domain.reasons import Failure
from shared.domain.sessions import SessionState
from shared.domain.templates import Template
from shared.domain.vmi import vmi_name
from shared.domain.vmi_status import failure_of, is_ready, is_unschedulable, vm_views
from shared.session_life import SessionLife

log = structlog.get_logger(__name__)

# Fingerprints kept for skipping repeats; past this many, the oldest are forgotten.
_MAX_REMEMBERED: Final = 100_000
# The startup time a fresh environment needs left to be worth trying after a failed boot.
REPLACEMENT_BOOT_SECONDS: Final = 60.0


class EnvironmentObserver:
    def __init__(
        self,
        *,
        life: SessionLife,
        templates: dict[str, Template],
        pools: PoolEnvironments | None,
        follow_sessions: bool = True,
    ) -> None:
        self._life = life
        self._templates = templates
        self._pools = pools
        self._follow_sessions = follow_sessions
        self._last: dict[str, Hashable] = {}

    def __call__(self, change: EnvironmentChange) -> None:
        fingerprint = _fingerprint(change)
        if self._last.get(change.environment_id) == fingerprint:
            return
        session_id = change.labels.get(SESSION_LABEL)
        if session_id:
            if not self._follow_sessions or not self._session_environment(session_id, change):
                return
        elif POOL_LABEL in change.labels and self._pools is not None:
            self._pools.observe(change)
        else:
            return
        self._remember(change.environment_id, fingerprint if change.vmis else None)

    def _remember(self, environment_id: str, fingerprint: Hashable | None) -> None:
        if fingerprint is None:
            self._last.pop(environment_id, None)
            return
        if len(self._last) >= _MAX_REMEMBERED:
            self._last.pop(next(iter(self._last)))
        self._last[environment_id] = fingerprint

    def _session_environment(self, session_id: str, change: EnvironmentChange) -> bool:
        """Apply what the change means to its session; False when there was nobody to tell
        (no session yet, or a rebuild still to come), so the next change is judged again."""
        session = self._life.get(session_id)
        if session is None or session.environment_id != change.environment_id:
            return False  # not (or no longer) this environment's session: the reconciler judges
        if session.state is SessionState.TERMINATING:
            if not change.vmis:
                self._life.finish(session_id)
            return True
        template = self._templates.get(session.template)
        if not session.is_live or template is None:
            return True
        for vmi in change.vmis:
            problem = failure_of(vmi)
            if problem is None:
                continue
            booting = session.state is SessionState.PROVISIONING
            # A boot that failed gets one fresh environment while the startup time allows;
            # after that the provisioning has failed for good (and goes to the dead letters).
            if not booting or not self._life.replace_environment(
                session_id, boot_seconds=REPLACEMENT_BOOT_SECONDS
            ):
                self._life.fail(session_id, Failure.vm_failed(problem), provisioning_failed=booting)
            return True
        present = {vmi_name(vmi) for vmi in change.vmis}
        expected = [environment_vmi_name(session.environment_id, vm.name) for vm in template.vms]
        views = vm_views(template, change.vmis)
        if session.state is SessionState.READY:
            missing = [name for name in expected if name not in present]
            if missing:
                self._life.fail(session_id, Failure.vm_vanished(missing[0]))
            else:
                self._life.refresh_vms(session_id, views)
            return True
        if all(name in present for name in expected) and all(is_ready(v) for v in change.vmis):
            self._life.mark_ready(session_id, views)
        elif change.vmis:
            self._life.record_progress(session_id, views)
        return True


def _fingerprint(change: EnvironmentChange) -> Hashable:
    """What labvirt reads of an environment: who holds it and each VM's standing."""
    holder = (change.labels.get(SESSION_LABEL), change.labels.get(POOL_LABEL))
    return (
        holder,
        tuple(
            (
                vmi_name(vmi),
                (vmi.get("status") or {}).get("phase"),
                is_ready(vmi),
                failure_of(vmi),
                is_unschedulable(vmi),
                tuple(
                    i.get("ipAddress") for i in (vmi.get("status") or {}).get("interfaces") or []
                ),
            )
            for vmi in change.vmis
        ),
    )
