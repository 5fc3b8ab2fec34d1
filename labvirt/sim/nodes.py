"""The simulated cluster's nodes and a kube-scheduler in miniature.

Each virt-launcher pod asks for CPU and memory; a node takes it when the sum of what it already
holds plus the request stays within its allocatable capacity and its pod limit. Among the nodes
that fit, the least allocated wins (the default ``NodeResourcesFit`` scoring spreads pods). A pod
that fits nowhere gets the scheduler's ``FailedScheduling`` message. Each node hands out pod IPs
from its own /24 of the cluster CIDR, the way the host-local IPAM plugin does.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from labvirt.sim.quantity import format_bytes, format_millicores

MAX_PODS_PER_NODE = 110  # the kubelet's default --max-pods
CLUSTER_CIDR = ipaddress.IPv4Network("10.244.0.0/16")


@dataclass(frozen=True)
class PodRequest:
    cpu_millicores: int
    memory_bytes: int


@dataclass
class Node:
    name: str
    cpu_millicores: int
    memory_bytes: int
    pod_cidr: ipaddress.IPv4Network
    max_pods: int = MAX_PODS_PER_NODE
    pods: dict[str, PodRequest] = field(default_factory=dict)
    ips: dict[str, str] = field(default_factory=dict)  # pod key -> IP
    _next_host: int = 2  # .1 is the node's bridge

    @property
    def allocated_cpu(self) -> int:
        return sum(p.cpu_millicores for p in self.pods.values())

    @property
    def allocated_memory(self) -> int:
        return sum(p.memory_bytes for p in self.pods.values())

    def misfits(self, request: PodRequest) -> list[str]:
        """The scheduler's reasons this node cannot take the pod (empty when it fits)."""
        reasons = []
        if len(self.pods) + 1 > self.max_pods:
            reasons.append("Too many pods")
        if self.allocated_cpu + request.cpu_millicores > self.cpu_millicores:
            reasons.append("Insufficient cpu")
        if self.allocated_memory + request.memory_bytes > self.memory_bytes:
            reasons.append("Insufficient memory")
        return reasons

    def load(self, request: PodRequest) -> float:
        """Mean share of CPU and memory in use once the pod is added (lower scores better)."""
        cpu = (self.allocated_cpu + request.cpu_millicores) / max(self.cpu_millicores, 1)
        memory = (self.allocated_memory + request.memory_bytes) / max(self.memory_bytes, 1)
        return (cpu + memory) / 2

    def allocate_ip(self, key: str) -> str:
        """The next free address after the last one handed out, wrapping like host-local."""
        in_use = set(self.ips.values())
        hosts = self.pod_cidr.num_addresses - 2  # no network or broadcast address
        for _ in range(hosts):
            candidate = self._next_host
            self._next_host = candidate + 1 if candidate + 1 <= hosts else 2
            address = str(self.pod_cidr.network_address + candidate)
            if address not in in_use:
                self.ips[key] = address
                return address
        raise RuntimeError(f"{self.name}: pod CIDR {self.pod_cidr} is exhausted")


@dataclass(frozen=True)
class Placement:
    node: str
    ip: str


class Cluster:
    def __init__(self, *, nodes: int, cpu_millicores: int, memory_bytes: int) -> None:
        subnets = CLUSTER_CIDR.subnets(new_prefix=24)
        next(subnets)  # 10.244.0.0/24 belongs to the control plane
        self.nodes = [
            Node(f"node{index:02d}", cpu_millicores, memory_bytes, next(subnets))
            for index in range(1, nodes + 1)
        ]
        self._where: dict[str, Node] = {}

    def place(self, key: str, request: PodRequest) -> Placement | None:
        """Bind the pod ``key`` to the least loaded node that fits, or None."""
        if key in self._where:
            node = self._where[key]
            return Placement(node.name, node.ips[key])
        fitting = [n for n in self.nodes if not n.misfits(request)]
        if not fitting:
            return None
        node = min(fitting, key=lambda n: (n.load(request), n.name))
        node.pods[key] = request
        self._where[key] = node
        return Placement(node.name, node.allocate_ip(key))

    def release(self, key: str) -> bool:
        """Free the pod's resources and IP; False when it held none."""
        node = self._where.pop(key, None)
        if node is None:
            return False
        node.pods.pop(key, None)
        node.ips.pop(key, None)
        return True

    def holds(self, key: str) -> bool:
        return key in self._where

    def unschedulable_message(self, request: PodRequest) -> str:
        """``0/3 nodes are available: 1 Insufficient cpu, 3 Insufficient memory.``"""
        counts: Counter[str] = Counter()
        for node in self.nodes:
            counts.update(node.misfits(request))
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(counts.items()))
        return f"0/{len(self.nodes)} nodes are available: {reasons}."

    def usage(self) -> list[dict[str, Any]]:
        return [
            {
                "name": node.name,
                "podCIDR": str(node.pod_cidr),
                "capacity": {
                    "cpu": format_millicores(node.cpu_millicores),
                    "memory": format_bytes(node.memory_bytes),
                    "pods": node.max_pods,
                    "cpuMillicores": node.cpu_millicores,
                    "memoryBytes": node.memory_bytes,
                },
                "allocated": {
                    "cpu": format_millicores(node.allocated_cpu),
                    "memory": format_bytes(node.allocated_memory),
                    "pods": len(node.pods),
                    "cpuMillicores": node.allocated_cpu,
                    "memoryBytes": node.allocated_memory,
                },
            }
            for node in self.nodes
        ]
