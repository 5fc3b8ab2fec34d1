"""KubeVirt's controllers in the simulator: virt-controller, virt-handler and the kube-scheduler.

``KubeVirt`` installs the VMI admission in the store and listens to it; through a ``Scheduler``
(never a sleep) it moves each VMI through Pending -> Scheduling -> Scheduled -> Running, and
through graceful deletion, at the times its ``BootPlan`` drew when it was created.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from labvirt.sim.admission import VmiAdmission
from labvirt.sim.boot import BootPlan, SimulationConfig, draw_boot_plan, probe_delay
from labvirt.sim.clock import Scheduler
from labvirt.sim.errors import ApiError, not_found
from labvirt.sim.launcher import (
    domain_status,
    launcher_pod_request,
    pod_status,
    set_live_migratable,
)
from labvirt.sim.nodes import Cluster, Placement, PodRequest
from labvirt.sim.quantity import to_bytes
from labvirt.sim.store import Obj, ResourceType, Store, clone
from labvirt.sim.vmi import (
    DEFAULT_GRACE_PERIOD_SECONDS,
    FINALIZER,
    VMI,
    child_object,
    enter_phase,
    ready_false,
    set_condition,
)

NODE_NAME_LABEL = "kubevirt.io/nodeName"
FINAL_PHASES = frozenset({"Succeeded", "Failed"})
SYNC_FAILED_REASON = "Synchronizing with the Domain failed."
SYNC_FAILED_MESSAGE = (
    'server error. command SyncVMI failed: "LibvirtError(Code=1, Domain=10, '
    "Message='internal error: qemu unexpectedly closed the monitor: "
    "qemu-kvm: failed to initialize kvm: Cannot allocate memory')\""
)


@dataclass
class _Tracked:
    """What the controllers know of one VMI (by uid) beyond its stored object."""

    uid: str
    namespace: str
    name: str
    request: PodRequest
    plan: BootPlan
    phase: str = "Pending"
    placement: Placement | None = None
    deleting: bool = False
    overrun: bool = False  # the grace period ends before the guest would stop


class KubeVirt:
    """virt-controller, virt-handler and the scheduler, driven by store events and timers."""

    def __init__(self, store: Store, scheduler: Scheduler, config: SimulationConfig) -> None:
        self._store = store
        self._scheduler = scheduler
        self._config = config
        self._rng = random.Random(config.seed)
        self.boot_failure_rate = config.boot_failure_rate
        self._cluster = Cluster(
            nodes=config.nodes,
            cpu_millicores=config.node_cpu * 1000,
            memory_bytes=to_bytes(config.node_memory),
        )
        self._tracked: dict[str, _Tracked] = {}
        self._waiting: list[str] = []  # uids of launcher pods that fit nowhere, oldest first
        self.admission = VmiAdmission(scheduler.now, config.vmi_schema_path)
        store.register(VMI, self.admission)
        store.add_listener(self._on_event)

    # -- public -------------------------------------------------------------------------------

    def crash(self, namespace: str, name: str) -> Obj:
        """Kill the guest of a Running VMI: it fails and its pod goes away."""
        current = self._store.peek(VMI, namespace, name)
        if current is None:
            raise not_found(VMI.plural, VMI.group, name)
        phase = (current.get("status") or {}).get("phase", "")
        if phase != "Running":
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {VMI.plural}.{VMI.group} "{name}": '
                f"the VMI is not running (phase {phase or 'unset'})",
                details={"name": name, "group": VMI.group, "kind": VMI.plural},
            )
        uid = current["metadata"]["uid"]
        tracked = self._tracked.get(uid)

        def fail(obj: Obj, now: float) -> None:
            status = obj.setdefault("status", {})
            enter_phase(status, "Failed", now)
            ready_false(status, "PodTerminating", now)

        updated = self._write_uid(uid, namespace, name, fail)
        if tracked is not None:
            tracked.phase = "Failed"
            self._release(tracked)
        return clone(updated if updated is not None else current)

    def node_usage(self) -> list[dict[str, Any]]:
        """Per node: name, podCIDR, capacity and allocated (cpu, memory, pods)."""
        return self._cluster.usage()

    @property
    def waiting_for_capacity(self) -> int:
        """VMIs whose launcher pod fits on no node right now."""
        return len(self._waiting)

    # -- events ---------------------------------------------------------------------------------

    def _on_event(self, event_type: str, resource: ResourceType, obj: Obj, _: Obj | None) -> None:
        if resource != VMI:
            return
        meta = obj.get("metadata", {})
        uid = meta.get("uid", "")
        if event_type == "ADDED":
            self._track(obj)
        elif event_type == "MODIFIED":
            tracked = self._tracked.get(uid)
            if tracked is not None and meta.get("deletionTimestamp") and not tracked.deleting:
                self._begin_deletion(tracked, obj)
        elif event_type == "DELETED":
            self._forget(uid)

    def _track(self, obj: Obj) -> None:
        meta = obj["metadata"]
        tracked = _Tracked(
            uid=meta["uid"],
            namespace=meta.get("namespace", ""),
            name=meta["name"],
            request=launcher_pod_request(obj["spec"]),
            plan=draw_boot_plan(self._rng, self._config, self.boot_failure_rate),
        )
        self._tracked[tracked.uid] = tracked
        self._after(tracked.plan.pod_create, tracked, self._create_pod)

    # -- lifecycle steps ------------------------------------------------------------------------

    def _create_pod(self, tracked: _Tracked) -> None:
        """virt-controller created the launcher pod; the scheduler binds it or cannot."""
        if tracked.deleting or tracked.phase != "Pending":
            return
        tracked.phase = "Scheduling"
        placement = self._cluster.place(tracked.uid, tracked.request)
        tracked.placement = placement
        message = None if placement else self._cluster.unschedulable_message(tracked.request)

        def scheduling(obj: Obj, now: float) -> None:
            status = obj.setdefault("status", {})
            enter_phase(status, "Scheduling", now)
            ready_false(status, "GuestNotRunning", now)
            if placement is not None:
                _bound(status, tracked, placement, now)
            else:
                _unschedulable(status, message, now)

        if self._write(tracked, scheduling) is None:
            self._cluster.release(tracked.uid)
            return
        if placement is not None:
            self._after(tracked.plan.pod_start, tracked, self._pod_ready)
        else:
            self._waiting.append(tracked.uid)

    def _pod_ready(self, tracked: _Tracked) -> None:
        """The launcher pod runs: the VMI has a node and an address."""
        placement = tracked.placement
        if tracked.deleting or tracked.phase != "Scheduling" or placement is None:
            return
        tracked.phase = "Scheduled"

        def scheduled(obj: Obj, now: float) -> None:
            child_object(obj["metadata"], "labels")[NODE_NAME_LABEL] = placement.node
            status = obj.setdefault("status", {})
            enter_phase(status, "Scheduled", now)
            status.update(pod_status(obj["spec"], placement, tracked.plan.mac_suffix))

        stored = self._write(tracked, scheduled)
        if stored is None:
            return
        self._after(tracked.plan.domain_start, tracked, self._domain_up)
        probe = stored["spec"].get("readinessProbe")
        if probe and not tracked.plan.fails:
            self._after(
                probe_delay(tracked.plan, probe, self._config.time_scale),
                tracked,
                self._probe_passed,
            )

    def _domain_up(self, tracked: _Tracked) -> None:
        """virt-handler started the domain, or the domain failed to start."""
        if tracked.deleting or tracked.phase != "Scheduled":
            return
        if tracked.plan.fails:
            tracked.phase = "Failed"

            def failed(obj: Obj, now: float) -> None:
                status = obj.setdefault("status", {})
                enter_phase(status, "Failed", now)
                ready_false(status, "PodTerminating", now)
                set_condition(
                    status,
                    "Synchronized",
                    "False",
                    now,
                    reason=SYNC_FAILED_REASON,
                    message=SYNC_FAILED_MESSAGE,
                )

            self._write(tracked, failed)
            self._release(tracked)
            return
        tracked.phase = "Running"

        def running(obj: Obj, now: float) -> None:
            spec = obj["spec"]
            status = obj.setdefault("status", {})
            enter_phase(status, "Running", now)
            if spec.get("readinessProbe"):
                set_condition(
                    status,
                    "Ready",
                    "False",
                    now,
                    reason="ContainersNotReady",
                    message="containers with unready status: [compute]",
                )
            else:
                set_condition(status, "Ready", "True", now)
            set_live_migratable(status, spec, now)
            status.update(domain_status(spec))

        self._write(tracked, running)

    def _probe_passed(self, tracked: _Tracked) -> None:
        if tracked.deleting or tracked.phase != "Running":
            return

        def ready(obj: Obj, now: float) -> None:
            set_condition(obj.setdefault("status", {}), "Ready", "True", now)

        self._write(tracked, ready)

    # -- deletion -------------------------------------------------------------------------------

    def _begin_deletion(self, tracked: _Tracked, obj: Obj) -> None:
        tracked.deleting = True
        if tracked.uid in self._waiting:
            self._waiting.remove(tracked.uid)
        if tracked.placement is None or tracked.phase in FINAL_PHASES:
            # No pod (never bound, or already gone): nothing to shut down.
            self._cluster.release(tracked.uid)
            self._after(tracked.plan.finalize, tracked, self._remove_finalizer, when_deleting=True)
            return
        grace = obj["metadata"].get("deletionGracePeriodSeconds") or 0
        if grace <= 0:
            grace = obj["spec"].get("terminationGracePeriodSeconds", DEFAULT_GRACE_PERIOD_SECONDS)
        grace = min(float(grace), self._config.max_grace_seconds) * self._config.time_scale
        tracked.overrun = 0 < grace < tracked.plan.shutdown
        stop_after = grace if tracked.overrun else tracked.plan.shutdown

        def terminating(obj: Obj, now: float) -> None:
            ready_false(obj.setdefault("status", {}), "PodTerminating", now)

        self._after(
            min(0.02 * self._config.time_scale, stop_after),
            tracked,
            lambda t: self._write(t, terminating),
            when_deleting=True,
        )
        self._after(stop_after, tracked, self._guest_stopped, when_deleting=True)

    def _guest_stopped(self, tracked: _Tracked) -> None:
        """The guest shut down (or was killed when the grace period ran out)."""
        if tracked.phase not in FINAL_PHASES:
            final = "Succeeded"
            if tracked.phase != "Running" or tracked.overrun:
                final = "Failed"  # never booted, or would not stop in time
            tracked.phase = final

            def stopped(obj: Obj, now: float) -> None:
                status = obj.setdefault("status", {})
                enter_phase(status, final, now)
                ready_false(status, "PodTerminating", now)

            if self._write(tracked, stopped) is None:
                return
        self._release(tracked)
        self._after(tracked.plan.finalize, tracked, self._remove_finalizer, when_deleting=True)

    def _remove_finalizer(self, tracked: _Tracked) -> None:
        def unfinalize(obj: Obj, _: float) -> None:
            finalizers = obj["metadata"].get("finalizers") or []
            obj["metadata"]["finalizers"] = [f for f in finalizers if f != FINALIZER]

        self._write(tracked, unfinalize)

    def _forget(self, uid: str) -> None:
        tracked = self._tracked.pop(uid, None)
        if tracked is None:
            return
        tracked.deleting = True
        if uid in self._waiting:
            self._waiting.remove(uid)
        self._release(tracked)

    # -- capacity -------------------------------------------------------------------------------

    def _release(self, tracked: _Tracked) -> None:
        if self._cluster.release(tracked.uid):
            self._place_waiting()

    def _place_waiting(self) -> None:
        """Retry unschedulable launcher pods, oldest first, now that room may have freed."""
        for uid in list(self._waiting):
            tracked = self._tracked.get(uid)
            if tracked is None or tracked.deleting or tracked.phase != "Scheduling":
                self._waiting.remove(uid)
                continue
            placement = self._cluster.place(uid, tracked.request)
            if placement is None:
                message = self._cluster.unschedulable_message(tracked.request)

                def still_unschedulable(obj: Obj, now: float, message: str = message) -> None:
                    _unschedulable(obj.setdefault("status", {}), message, now)

                self._write(tracked, still_unschedulable)
                continue
            self._waiting.remove(uid)
            tracked.placement = placement

            def bound(
                obj: Obj, now: float, t: _Tracked = tracked, p: Placement = placement
            ) -> None:
                _bound(obj.setdefault("status", {}), t, p, now)

            if self._write(tracked, bound) is None:
                self._cluster.release(uid)
                continue
            self._after(tracked.plan.pod_start, tracked, self._pod_ready)

    # -- plumbing -------------------------------------------------------------------------------

    def _after(
        self,
        delay: float,
        tracked: _Tracked,
        step: Callable[[_Tracked], object],
        *,
        when_deleting: bool = False,
    ) -> None:
        """Run ``step`` later if this very VMI (same uid) is still known then."""
        uid = tracked.uid

        def fire() -> None:
            current = self._tracked.get(uid)
            if current is None or (current.deleting and not when_deleting):
                return
            step(current)

        self._scheduler.call_at(self._scheduler.now() + max(0.0, delay), fire)

    def _write(self, tracked: _Tracked, change: Callable[[Obj, float], None]) -> Obj | None:
        return self._write_uid(tracked.uid, tracked.namespace, tracked.name, change)

    def _write_uid(
        self, uid: str, namespace: str, name: str, change: Callable[[Obj, float], None]
    ) -> Obj | None:
        """A controller write to the object with this uid; None once it is gone or replaced."""
        now = self._scheduler.now()

        def mutate(obj: Obj) -> None:
            if obj["metadata"].get("uid") == uid:
                change(obj, now)

        stored = self._store.controller_update(VMI, namespace, name, mutate)
        if stored is None or stored["metadata"].get("uid") != uid:
            return None
        return stored


def _bound(status: Obj, tracked: _Tracked, placement: Placement, now: float) -> None:
    set_condition(status, "PodScheduled", "True", now)
    status["activePods"] = {tracked.plan.pod_uid: placement.node}


def _unschedulable(status: Obj, message: str | None, now: float) -> None:
    set_condition(status, "PodScheduled", "False", now, reason="Unschedulable", message=message)
