"""Launcher pod requests, node capacity, unschedulable VMIs and their later placement."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from labvirt.sim.boot import SimulationConfig
from labvirt.sim.clock import FakeScheduler
from labvirt.sim.controllers import KubeVirt
from labvirt.sim.launcher import (
    LAUNCHER_MEMORY_OVERHEAD,
    MEMORY_OVERHEAD_PER_VCPU,
    launcher_pod_request,
)
from labvirt.sim.nodes import Cluster, PodRequest
from labvirt.sim.store import Obj, Store
from labvirt.sim.vmi import VMI

NS = "labs"
GI = 2**30
MI = 2**20


def spec(request: str | None = "1Gi", **domain: Any) -> Obj:
    resources = {"requests": {"memory": request}} if request else {}
    return {"domain": {"devices": {}, "resources": resources, **domain}}


def vmi(name: str, memory: str = "1Gi") -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {
            "domain": {
                "devices": {"disks": [{"name": "containerdisk", "disk": {"bus": "virtio"}}]},
                "resources": {"requests": {"memory": memory}},
            },
            "volumes": [{"name": "containerdisk", "containerDisk": {"image": "cirros:6"}}],
        },
    }


def kubevirt(**overrides: Any) -> tuple[Store, FakeScheduler, KubeVirt]:
    clock = FakeScheduler()
    store = Store(clock, seed=2)
    return store, clock, KubeVirt(store, clock, SimulationConfig(**{"seed": 9, **overrides}))


def status(store: Store, name: str) -> Obj:
    obj = store.peek(VMI, NS, name)
    assert obj is not None
    return dict(obj["status"])


def pod_scheduled(store: Store, name: str) -> Obj | None:
    return next(
        (c for c in status(store, name).get("conditions", []) if c["type"] == "PodScheduled"), None
    )


# -- what a launcher pod asks for ---------------------------------------------------------------


def test_default_cpu_is_a_tenth_of_a_core_per_vcpu() -> None:
    request = launcher_pod_request(spec(cpu={"cores": 2, "sockets": 1, "threads": 2}))
    assert request.cpu_millicores == 400
    overhead = LAUNCHER_MEMORY_OVERHEAD + 4 * MEMORY_OVERHEAD_PER_VCPU + GI // 512
    assert request.memory_bytes == GI + overhead


def test_explicit_cpu_requests_and_limits() -> None:
    with_request = spec()
    with_request["domain"]["resources"]["requests"]["cpu"] = "1500m"
    assert launcher_pod_request(with_request).cpu_millicores == 1500
    with_limit = spec()
    with_limit["domain"]["resources"]["limits"] = {"cpu": "2"}
    assert launcher_pod_request(with_limit).cpu_millicores == 2000


def test_dedicated_cpus_take_whole_cores() -> None:
    request = launcher_pod_request(spec(cpu={"cores": 3, "dedicatedCpuPlacement": True}))
    assert request.cpu_millicores == 3000


def test_guest_memory_counts_when_no_request_is_given() -> None:
    request = launcher_pod_request(spec(request=None, memory={"guest": "2Gi"}))
    assert request.memory_bytes > 2 * GI
    assert request.memory_bytes - 2 * GI < 256 * MI  # a little launcher overhead


# -- the cluster --------------------------------------------------------------------------------


def test_nodes_are_named_and_get_their_own_pod_cidr() -> None:
    cluster = Cluster(nodes=3, cpu_millicores=16000, memory_bytes=64 * GI)
    assert [n.name for n in cluster.nodes] == ["node01", "node02", "node03"]
    assert [str(n.pod_cidr) for n in cluster.nodes] == [
        "10.244.1.0/24",
        "10.244.2.0/24",
        "10.244.3.0/24",
    ]


def test_pods_spread_over_the_least_loaded_nodes() -> None:
    cluster = Cluster(nodes=3, cpu_millicores=16000, memory_bytes=64 * GI)
    request = PodRequest(100, GI)
    placements = [cluster.place(f"p{i}", request) for i in range(6)]
    assert [p.node for p in placements if p] == ["node01", "node02", "node03"] * 2


def test_placing_twice_is_idempotent_and_release_frees() -> None:
    cluster = Cluster(nodes=1, cpu_millicores=1000, memory_bytes=GI)
    first = cluster.place("a", PodRequest(500, GI // 2))
    assert first == cluster.place("a", PodRequest(500, GI // 2))
    assert cluster.holds("a")
    assert cluster.release("a") is True
    assert cluster.release("a") is False
    assert cluster.usage()[0]["allocated"] == {
        "cpu": "0",
        "memory": "0",
        "pods": 0,
        "cpuMillicores": 0,
        "memoryBytes": 0,
    }


def test_unschedulable_message_counts_reasons_per_node() -> None:
    cluster = Cluster(nodes=2, cpu_millicores=1000, memory_bytes=4 * GI)
    assert cluster.place("big", PodRequest(900, GI)) is not None
    request = PodRequest(500, 8 * GI)
    assert cluster.place("huge", request) is None
    assert cluster.unschedulable_message(request) == (
        "0/2 nodes are available: 1 Insufficient cpu, 2 Insufficient memory."
    )


def test_pod_limit_per_node() -> None:
    cluster = Cluster(nodes=1, cpu_millicores=10**9, memory_bytes=10**15)
    for index in range(110):
        assert cluster.place(f"p{index}", PodRequest(1, 1)) is not None
    assert cluster.place("one-more", PodRequest(1, 1)) is None
    assert (
        cluster.unschedulable_message(PodRequest(1, 1))
        == "0/1 nodes are available: 1 Too many pods."
    )


@settings(max_examples=30, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=400))
def test_pod_ips_stay_unique_through_churn(operations: list[bool]) -> None:
    """True places a pod, False releases the oldest one; live IPs never collide."""
    cluster = Cluster(nodes=1, cpu_millicores=10**9, memory_bytes=10**15)
    live: dict[str, str] = {}
    counter = 0
    for place in operations:
        if place and len(live) < 110:
            counter += 1
            placement = cluster.place(f"p{counter}", PodRequest(1, 1))
            assert placement is not None
            live[f"p{counter}"] = placement.ip
        elif live:
            cluster.release(next(iter(live)))
            live.pop(next(iter(live)))
        assert len(set(live.values())) == len(live)
        assert all(
            ipaddress.ip_address(ip) in ipaddress.ip_network("10.244.1.0/24")
            for ip in live.values()
        )


@given(st.lists(st.tuples(st.integers(1, 4000), st.integers(1, 8 * GI)), max_size=60))
def test_allocations_never_exceed_capacity(requests: list[tuple[int, int]]) -> None:
    cluster = Cluster(nodes=3, cpu_millicores=16000, memory_bytes=64 * GI)
    for index, (cpu, memory) in enumerate(requests):
        cluster.place(f"p{index}", PodRequest(cpu, memory))
    for node in cluster.usage():
        capacity, allocated = node["capacity"], node["allocated"]
        assert isinstance(capacity, dict)
        assert isinstance(allocated, dict)
        assert allocated["cpuMillicores"] <= capacity["cpuMillicores"]
        assert allocated["memoryBytes"] <= capacity["memoryBytes"]


# -- unschedulable VMIs -------------------------------------------------------------------------


def test_vmi_that_fits_nowhere_waits_in_scheduling() -> None:
    store, clock, kv = kubevirt(nodes=3, node_memory="4Gi")
    store.create(VMI, NS, vmi("huge", memory="8Gi"))
    clock.advance(300)
    assert status(store, "huge")["phase"] == "Scheduling"
    condition = pod_scheduled(store, "huge")
    assert condition == {
        "type": "PodScheduled",
        "status": "False",
        "lastProbeTime": None,
        "lastTransitionTime": condition["lastTransitionTime"] if condition else None,
        "reason": "Unschedulable",
        "message": "0/3 nodes are available: 3 Insufficient memory.",
    }
    ready = next(c for c in status(store, "huge")["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "GuestNotRunning")
    assert "nodeName" not in status(store, "huge")
    assert kv.waiting_for_capacity == 1


def test_waiting_vmi_is_placed_when_room_frees() -> None:
    store, clock, kv = kubevirt(nodes=1, node_memory="3Gi")
    store.create(VMI, NS, vmi("first", memory="2Gi"))
    clock.advance(60)
    assert status(store, "first")["phase"] == "Running"
    store.create(VMI, NS, vmi("second", memory="2Gi"))
    clock.advance(60)
    assert status(store, "second")["phase"] == "Scheduling"
    assert kv.node_usage()[0]["allocated"]["pods"] == 1
    store.delete(VMI, NS, "first")
    clock.advance(2)
    assert store.peek(VMI, NS, "first") is None
    condition = pod_scheduled(store, "second")
    assert condition is not None
    assert condition["status"] == "True"
    assert "reason" not in condition
    clock.advance(60)
    assert status(store, "second")["phase"] == "Running"
    assert status(store, "second")["nodeName"] == "node01"
    assert kv.waiting_for_capacity == 0


def test_waiting_vmis_are_placed_oldest_first() -> None:
    store, clock, _ = kubevirt(nodes=1, node_memory="3Gi")
    store.create(VMI, NS, vmi("holder", memory="2Gi"))
    clock.advance(60)
    store.create(VMI, NS, vmi("older", memory="2Gi"))
    clock.advance(1)
    store.create(VMI, NS, vmi("newer", memory="2Gi"))
    clock.advance(60)
    store.delete(VMI, NS, "holder")
    clock.advance(60)
    assert status(store, "older")["phase"] == "Running"
    assert status(store, "newer")["phase"] == "Scheduling"


def test_small_vmi_is_not_blocked_by_a_big_waiting_one() -> None:
    store, clock, _ = kubevirt(nodes=1, node_memory="4Gi")
    store.create(VMI, NS, vmi("giant", memory="16Gi"))
    store.create(VMI, NS, vmi("small", memory="512Mi"))
    clock.advance(60)
    assert status(store, "giant")["phase"] == "Scheduling"
    assert status(store, "small")["phase"] == "Running"


def test_deleting_a_waiting_vmi_removes_it_from_the_queue() -> None:
    store, clock, kv = kubevirt(nodes=1, node_memory="2Gi")
    store.create(VMI, NS, vmi("huge", memory="8Gi"))
    clock.advance(10)
    assert kv.waiting_for_capacity == 1
    store.delete(VMI, NS, "huge")
    clock.advance(1)
    assert store.peek(VMI, NS, "huge") is None
    assert kv.waiting_for_capacity == 0


def test_crash_frees_room_for_a_waiting_vmi() -> None:
    store, clock, kv = kubevirt(nodes=1, node_memory="3Gi")
    store.create(VMI, NS, vmi("first", memory="2Gi"))
    clock.advance(60)
    store.create(VMI, NS, vmi("second", memory="2Gi"))
    clock.advance(10)
    kv.crash(NS, "first")
    clock.advance(60)
    assert status(store, "first")["phase"] == "Failed"
    assert status(store, "second")["phase"] == "Running"


def test_node_usage_reports_capacity_and_allocation() -> None:
    store, clock, kv = kubevirt(nodes=2, node_cpu=8, node_memory="32Gi")
    store.create(VMI, NS, vmi("a", memory="1Gi"))
    clock.advance(60)
    usage = kv.node_usage()
    assert [n["name"] for n in usage] == ["node01", "node02"]
    assert usage[0]["capacity"] == {
        "cpu": "8",
        "memory": "32Gi",
        "pods": 110,
        "cpuMillicores": 8000,
        "memoryBytes": 32 * GI,
    }
    allocated = usage[0]["allocated"]
    assert isinstance(allocated, dict)
    assert allocated["pods"] == 1
    assert allocated["cpuMillicores"] == 100
    assert GI < allocated["memoryBytes"] < GI + 256 * MI


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"nodes": 0}, "nodes must be at least 1"),
        ({"node_memory": "lots"}, "node_memory is not a quantity"),
        ({"boot_failure_rate": 1.5}, "boot_failure_rate must be within [0, 1]"),
        ({"time_scale": 0}, "time_scale must be positive"),
        ({"boot_seconds": -1}, "boot_seconds must be positive"),
    ],
)
def test_bad_config_fails_fast(overrides: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match="invalid simulation config") as caught:
        SimulationConfig(**overrides)
    assert problem in str(caught.value)
