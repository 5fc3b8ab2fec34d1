"""The VMI lifecycle on a fake clock: phases, readiness, boot times, deletion, crashes."""

from __future__ import annotations

import ipaddress
import json
import statistics
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jsonschema
import pytest

from labvirt.sim.boot import SimulationConfig
from labvirt.sim.clock import FakeScheduler
from labvirt.sim.controllers import KubeVirt
from labvirt.sim.errors import ApiError
from labvirt.sim.store import Obj, ResourceType, Store
from labvirt.sim.vmi import FINALIZER, VMI
from tests.conftest import STRICT_VMI_SCHEMA, require_kubevirt_reference

NS = "labs"
START = 1_700_000_000.0


@dataclass
class Sim:
    store: Store
    clock: FakeScheduler
    kubevirt: KubeVirt
    events: list[tuple[float, str, Obj]] = field(default_factory=list)

    def create(self, name: str, **spec: Any) -> Obj:
        return self.store.create(VMI, NS, vmi(name, **spec))

    def get(self, name: str) -> Obj | None:
        return self.store.peek(VMI, NS, name)

    def phase(self, name: str) -> str:
        obj = self.get(name)
        assert obj is not None, f"{name} is gone"
        return str(obj["status"]["phase"])

    def history(self, name: str) -> list[tuple[float, str, Obj]]:
        return [e for e in self.events if e[2]["metadata"]["name"] == name]

    def pods(self) -> int:
        return sum(int(n["allocated"]["pods"]) for n in self.kubevirt.node_usage())


def simulate(**overrides: Any) -> Sim:
    clock = FakeScheduler(start=START)
    store = Store(clock, seed=5)
    config = SimulationConfig(**{"seed": 42, **overrides})
    sim = Sim(store, clock, KubeVirt(store, clock, config))

    def record(event_type: str, resource: ResourceType, obj: Obj, _: Obj | None) -> None:
        if resource == VMI:
            sim.events.append((clock.now(), event_type, obj))

    store.add_listener(record)
    return sim


def vmi(name: str, memory: str = "1Gi", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "metadata": {"name": name, "labels": {"app": "lab"}},
        "spec": {
            "domain": {
                "devices": {
                    "disks": [{"name": "containerdisk", "disk": {"bus": "virtio"}}],
                    "interfaces": [{"name": "default", "masquerade": {}}],
                },
                "resources": {"requests": {"memory": memory}},
            },
            "networks": [{"name": "default", "pod": {}}],
            "volumes": [
                {
                    "name": "containerdisk",
                    "containerDisk": {"image": "quay.io/containerdisks/fedora:40"},
                }
            ],
        },
    }
    body["spec"].update(spec)
    return body


def condition(obj: Obj, kind: str) -> Obj | None:
    return next((c for c in obj["status"].get("conditions", []) if c["type"] == kind), None)


def epoch(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def running_at(sim: Sim, name: str) -> float:
    return next(t for t, _, o in sim.history(name) if o["status"].get("phase") == "Running")


# -- the happy path ---------------------------------------------------------------------------


def test_phases_advance_in_order_with_timestamps() -> None:
    sim = simulate()
    sim.create("box")
    sim.clock.advance(120)
    phases: list[str] = []
    for _, event_type, obj in sim.history("box"):
        phase = obj["status"]["phase"]
        if not phases or phases[-1] != phase:
            phases.append(phase)
        assert event_type in ("ADDED", "MODIFIED")
    assert phases == ["Pending", "Scheduling", "Scheduled", "Running"]

    running = sim.get("box")
    assert running is not None
    stamps = running["status"]["phaseTransitionTimestamps"]
    assert [s["phase"] for s in stamps] == phases
    times = [epoch(s["phaseTransitionTimestamp"]) for s in stamps]
    assert times == sorted(times)
    assert times[0] == START
    # Each timestamp is the (whole-second) time of the write that made the transition.
    for stamp in stamps:
        written = next(
            t for t, _, o in sim.history("box") if o["status"]["phase"] == stamp["phase"]
        )
        assert epoch(stamp["phaseTransitionTimestamp"]) == int(written)


def test_scheduled_sets_node_label_and_interfaces() -> None:
    sim = simulate()
    sim.create("box")
    while sim.phase("box") != "Scheduled":
        sim.clock.advance(0.5)
    scheduled = sim.get("box")
    assert scheduled is not None
    node = scheduled["status"]["nodeName"]
    assert node in {"node01", "node02", "node03"}
    assert scheduled["metadata"]["labels"]["kubevirt.io/nodeName"] == node
    [iface] = scheduled["status"]["interfaces"]
    assert iface["name"] == "default"
    assert iface["interfaceName"] == "eth0"
    assert iface["infoSource"] == "domain, guest-agent"
    assert iface["ipAddresses"] == [iface["ipAddress"]]
    assert ipaddress.ip_address(iface["ipAddress"]) in ipaddress.ip_network("10.244.0.0/16")
    assert len(iface["mac"].split(":")) == 6
    ready = condition(scheduled, "Ready")
    assert ready is not None
    assert (ready["status"], ready["reason"]) == ("False", "GuestNotRunning")
    scheduled_condition = condition(scheduled, "PodScheduled")
    assert scheduled_condition is not None
    assert scheduled_condition["status"] == "True"


def test_running_vmi_is_ready_and_valid_against_the_schema() -> None:
    sim = simulate()
    sim.create("box")
    sim.clock.advance(60)
    obj = sim.get("box")
    assert obj is not None
    assert obj["status"]["phase"] == "Running"
    ready = condition(obj, "Ready")
    assert ready is not None
    assert ready["status"] == "True"
    migratable = condition(obj, "LiveMigratable")
    assert migratable is not None
    assert migratable["status"] == "True"  # masquerade on the pod network migrates
    schema = json.loads(require_kubevirt_reference(STRICT_VMI_SCHEMA).read_text())
    errors = [e.message for e in jsonschema.Draft4Validator(schema).iter_errors(obj)]
    assert errors == []


def test_bridged_pod_interface_is_not_live_migratable() -> None:
    sim = simulate()
    body = vmi("box")
    del body["spec"]["networks"]
    del body["spec"]["domain"]["devices"]["interfaces"]
    sim.store.create(VMI, NS, body)
    sim.clock.advance(60)
    obj = sim.get("box")
    assert obj is not None
    migratable = condition(obj, "LiveMigratable")
    assert migratable is not None
    assert (migratable["status"], migratable["reason"]) == ("False", "InterfaceNotLiveMigratable")


def test_pod_ips_are_unique() -> None:
    sim = simulate()
    for index in range(60):
        sim.create(f"vm{index}", memory="256Mi")
    sim.clock.advance(120)
    ips = []
    for index in range(60):
        obj = sim.get(f"vm{index}")
        assert obj is not None
        assert obj["status"]["phase"] == "Running"
        ip = obj["status"]["interfaces"][0]["ipAddress"]
        node = int(obj["status"]["nodeName"].removeprefix("node"))
        assert ipaddress.ip_address(ip) in ipaddress.ip_network(f"10.244.{node}.0/24")
        ips.append(ip)
    assert len(set(ips)) == 60


def test_readiness_probe_delays_ready() -> None:
    sim = simulate()
    probe = {"tcpSocket": {"port": 22}, "initialDelaySeconds": 20, "periodSeconds": 5}
    sim.create("probed", readinessProbe=probe)
    sim.create("plain")
    sim.clock.advance(120)
    probed_running = running_at(sim, "probed")
    at_running = next(o for t, _, o in sim.history("probed") if t == probed_running)
    ready = condition(at_running, "Ready")
    assert ready is not None
    assert (ready["status"], ready["reason"]) == ("False", "ContainersNotReady")
    became_ready = next(
        t
        for t, _, o in sim.history("probed")
        if (c := condition(o, "Ready")) is not None and c["status"] == "True"
    )
    scheduled = next(t for t, _, o in sim.history("probed") if o["status"]["phase"] == "Scheduled")
    assert became_ready > probed_running
    assert became_ready >= scheduled + 20  # initialDelaySeconds, from the pod's start
    assert (became_ready - scheduled - 20) % 5 == pytest.approx(0, abs=1e-6)  # on a probe tick
    plain_ready = next(
        t
        for t, _, o in sim.history("plain")
        if (c := condition(o, "Ready")) is not None and c["status"] == "True"
    )
    assert plain_ready == running_at(sim, "plain")


# -- boot times -------------------------------------------------------------------------------


def boot_times(count: int = 40, **config: Any) -> list[float]:
    sim = simulate(**config)
    for index in range(count):
        sim.create(f"vm{index}", memory="256Mi")
    sim.clock.advance(600)
    return [running_at(sim, f"vm{index}") - START for index in range(count)]


def test_boot_times_repeat_with_a_seed_and_spread() -> None:
    first = boot_times(seed=7)
    assert first == boot_times(seed=7)
    assert first != boot_times(seed=8)
    assert len(set(first)) == len(first)
    assert max(first) / min(first) > 1.3
    assert 6.0 < statistics.median(first) < 10.5  # around boot_seconds=8
    assert all(0.6 * 8 - 1e-9 <= t <= 2.0 * 8 + 1e-9 for t in first)


def test_emulation_is_several_times_slower() -> None:
    native = statistics.median(boot_times(seed=3))
    emulated = statistics.median(boot_times(seed=3, emulation=True))
    assert emulated == pytest.approx(4 * native, abs=1e-5)  # epoch floats: ~1e-7 resolution


def test_time_scale_shrinks_every_duration() -> None:
    scaled = boot_times(seed=3, time_scale=0.01)
    assert scaled == pytest.approx([t * 0.01 for t in boot_times(seed=3)], abs=1e-5)
    assert max(scaled) < 0.2


def test_boot_seconds_moves_the_median() -> None:
    assert statistics.median(boot_times(seed=3, boot_seconds=20)) == pytest.approx(
        2.5 * statistics.median(boot_times(seed=3)), abs=1e-5
    )


# -- boot failures ----------------------------------------------------------------------------


def test_boot_failures_happen_at_the_configured_rate() -> None:
    sim = simulate(seed=11, boot_failure_rate=0.25, nodes=8)
    count = 400
    for index in range(count):
        sim.create(f"vm{index}", memory="128Mi")
    sim.clock.advance(300)
    phases = [sim.phase(f"vm{index}") for index in range(count)]
    failed = phases.count("Failed")
    assert phases.count("Running") + failed == count
    assert 0.18 * count < failed < 0.32 * count
    victim = sim.get(f"vm{phases.index('Failed')}")
    assert victim is not None
    stamps = [s["phase"] for s in victim["status"]["phaseTransitionTimestamps"]]
    assert stamps == ["Pending", "Scheduling", "Scheduled", "Failed"]
    synchronized = condition(victim, "Synchronized")
    assert synchronized is not None
    assert synchronized["status"] == "False"
    assert synchronized["reason"] == "Synchronizing with the Domain failed."
    ready = condition(victim, "Ready")
    assert ready is not None
    assert (ready["status"], ready["reason"]) == ("False", "PodTerminating")
    assert sim.pods() == count - failed  # failed launcher pods hold nothing


def test_boot_failure_rate_can_change_at_runtime() -> None:
    sim = simulate()
    sim.kubevirt.boot_failure_rate = 1.0
    sim.create("doomed")
    sim.clock.advance(60)
    assert sim.phase("doomed") == "Failed"
    sim.kubevirt.boot_failure_rate = 0.0
    sim.create("fine")
    sim.clock.advance(60)
    assert sim.phase("fine") == "Running"


def test_same_seed_same_timings_whatever_the_failure_rate() -> None:
    calm = boot_times(seed=5)
    sim = simulate(seed=5, boot_failure_rate=0.5)
    for index in range(40):
        sim.create(f"vm{index}", memory="256Mi")
    sim.clock.advance(600)
    for index in range(40):
        if sim.phase(f"vm{index}") == "Running":
            assert running_at(sim, f"vm{index}") - START == calm[index]


# -- deletion ---------------------------------------------------------------------------------


def test_deletion_events_in_order_and_capacity_released() -> None:
    sim = simulate(time_scale=1.0)
    sim.create("box", terminationGracePeriodSeconds=0)
    sim.clock.advance(60)
    assert sim.pods() == 1
    deleted_at = sim.clock.now()
    answer, removed = sim.store.delete(VMI, NS, "box")
    assert removed is False
    assert answer["metadata"]["deletionTimestamp"]
    assert answer["metadata"]["finalizers"] == [FINALIZER]
    sim.clock.advance(5)
    after = [(t, e, o) for t, e, o in sim.history("box") if t >= deleted_at]
    kinds = [
        (e, o["status"]["phase"], (condition(o, "Ready") or {}).get("reason")) for _, e, o in after
    ]
    assert kinds == [
        ("MODIFIED", "Running", None),  # deletionTimestamp set
        ("MODIFIED", "Running", "PodTerminating"),
        ("MODIFIED", "Succeeded", "PodTerminating"),
        ("DELETED", "Succeeded", "PodTerminating"),
    ]
    assert all(o["metadata"]["deletionTimestamp"] for _, _, o in after)
    gone_after = after[-1][0] - deleted_at
    assert 0.3 < gone_after < 1.0  # about 0.6 s at P50 upstream
    assert sim.get("box") is None
    assert sim.pods() == 0


def test_deletion_honours_the_grace_period_cap() -> None:
    sim = simulate(max_grace_seconds=0.1)
    sim.create("box")  # default grace: 30 s, capped to 0.1 s: the guest is killed
    sim.clock.advance(60)
    sim.store.delete(VMI, NS, "box", grace_period_seconds=10)
    start = sim.clock.now()
    sim.clock.advance(5)
    final = [
        (t, o)
        for t, e, o in sim.history("box")
        if e == "MODIFIED" and o["status"]["phase"] == "Failed"
    ]
    assert final
    assert final[0][0] - start == pytest.approx(0.1)
    assert sim.get("box") is None


def test_deleting_a_pending_vmi_just_removes_it() -> None:
    sim = simulate()
    sim.create("box")
    sim.store.delete(VMI, NS, "box")
    sim.clock.advance(120)
    assert sim.get("box") is None
    assert {o["status"]["phase"] for _, _, o in sim.history("box")} == {"Pending"}
    assert sim.history("box")[-1][1] == "DELETED"
    assert sim.pods() == 0
    assert sim.clock.pending() == 0


def test_deleting_while_booting_fails_the_vmi_and_frees_the_node() -> None:
    sim = simulate()
    sim.create("box")
    sim.clock.advance(1)
    assert sim.phase("box") == "Scheduling"
    assert sim.pods() == 1
    sim.store.delete(VMI, NS, "box")
    sim.clock.advance(120)
    assert sim.get("box") is None
    phases = [o["status"]["phase"] for _, _, o in sim.history("box")]
    assert "Running" not in phases
    assert phases[-1] == "Failed"
    assert sim.pods() == 0


def test_removing_the_finalizer_by_hand_forgets_the_vmi() -> None:
    sim = simulate()
    sim.create("box")
    sim.clock.advance(60)
    obj = sim.store.get(VMI, NS, "box")
    obj["metadata"]["finalizers"] = []
    sim.store.update(VMI, NS, "box", obj)
    sim.store.delete(VMI, NS, "box")
    assert sim.get("box") is None
    assert sim.pods() == 0
    sim.clock.advance(60)
    assert sim.get("box") is None


def test_recreated_vmi_is_not_touched_by_the_old_ones_timers() -> None:
    sim = simulate(seed=1)
    sim.create("box", readinessProbe={"tcpSocket": {"port": 22}, "initialDelaySeconds": 30})
    sim.clock.advance(1)  # the old one's pod is starting: its timers are pending
    sim.store.delete(VMI, NS, "box")
    sim.clock.advance(1)
    assert sim.get("box") is None
    reborn = sim.create("box")
    uid = reborn["metadata"]["uid"]
    sim.clock.advance(120)
    history = sim.history("box")
    born = next(i for i, (_, e, o) in enumerate(history) if o["metadata"]["uid"] == uid)
    assert all(o["metadata"]["uid"] == uid for _, _, o in history[born:])
    mine = [(e, o) for _, e, o in history[born:]]
    assert [o["status"]["phase"] for _, o in mine] == [
        "Pending",
        "Scheduling",
        "Scheduled",
        "Running",
    ]
    obj = sim.get("box")
    assert obj is not None
    assert [s["phase"] for s in obj["status"]["phaseTransitionTimestamps"]] == [
        "Pending",
        "Scheduling",
        "Scheduled",
        "Running",
    ]
    ready = condition(obj, "Ready")
    assert ready is not None
    assert ready["status"] == "True"  # no probe on the new one: ready at once
    assert sim.pods() == 1


# -- crashes ----------------------------------------------------------------------------------


def test_crash_fails_a_running_vmi_and_frees_its_node() -> None:
    sim = simulate()
    sim.create("box")
    sim.clock.advance(60)
    assert sim.pods() == 1
    crashed = sim.kubevirt.crash(NS, "box")
    assert crashed["status"]["phase"] == "Failed"
    ready = condition(crashed, "Ready")
    assert ready is not None
    assert (ready["status"], ready["reason"]) == ("False", "PodTerminating")
    assert sim.pods() == 0
    sim.clock.advance(60)
    assert sim.phase("box") == "Failed"  # stays until deleted
    sim.store.delete(VMI, NS, "box")
    sim.clock.advance(1)
    assert sim.get("box") is None


def test_crash_needs_a_running_vmi() -> None:
    sim = simulate()
    with pytest.raises(ApiError) as absent:
        sim.kubevirt.crash(NS, "nope")
    assert absent.value.code == 404
    assert absent.value.message == 'virtualmachineinstances.kubevirt.io "nope" not found'
    sim.create("box")
    with pytest.raises(ApiError) as pending:
        sim.kubevirt.crash(NS, "box")
    assert pending.value.code == 409
    assert pending.value.reason == "Conflict"
    sim.clock.advance(60)
    sim.kubevirt.crash(NS, "box")
    with pytest.raises(ApiError) as again:
        sim.kubevirt.crash(NS, "box")
    assert again.value.code == 409


def test_crash_during_graceful_deletion_still_finishes() -> None:
    sim = simulate()
    sim.create("box")
    sim.clock.advance(60)
    sim.store.delete(VMI, NS, "box")
    sim.kubevirt.crash(NS, "box")
    sim.clock.advance(5)
    assert sim.get("box") is None
    assert sim.pods() == 0


# -- printing ---------------------------------------------------------------------------------
