"""How the simulated KubeVirt behaves, and how long each step of a VMI's life takes.

``SimulationConfig`` is what the KubeVirt part of ``labvirt sim`` is told. ``draw_boot_plan``
turns it into one VMI's durations, drawn from a seeded distribution so that runs repeat;
``time_scale`` shrinks every duration for tests.
"""

from __future__ import annotations

import math
import random
import uuid
from dataclasses import dataclass
from pathlib import Path

from labvirt.sim.quantity import QuantityError, to_bytes
from labvirt.sim.store import Obj

EMULATION_SLOWDOWN = 4.0  # software emulation (no nested virtualisation) boots this much slower
BOOT_SPREAD_SIGMA = 0.25  # lognormal sigma of boot times around their median
BOOT_FACTOR_RANGE = (0.6, 2.0)  # truncation of the lognormal factor
# How a boot splits: virt-controller creates the launcher pod, the pod pulls the container
# disk and starts (-> Scheduled), virt-handler starts the domain (-> Running).
POD_CREATE_SHARE, POD_START_SHARE, DOMAIN_START_SHARE = 0.04, 0.66, 0.30
GUEST_SERVICES_SHARE = 0.75  # guest services (sshd, agent) answer this long after the domain
DEFAULT_PROBE_PERIOD_SECONDS = 10


@dataclass(frozen=True)
class SimulationConfig:
    """Checked once, at start-up: a bad value stops the simulator with every problem named."""

    boot_seconds: float = 8.0  # median creation -> Running
    emulation: bool = False  # software emulation: boots EMULATION_SLOWDOWN times slower
    nodes: int = 3
    node_cpu: int = 16
    node_memory: str = "64Gi"
    boot_failure_rate: float = 0.0
    seed: int | None = None
    time_scale: float = 1.0  # multiplies every simulated duration (tests use e.g. 0.01)
    vmi_schema_path: Path | None = None  # vmi-schema-strict.json: validate every create
    max_grace_seconds: float = 30.0

    def __post_init__(self) -> None:
        problems = []
        if self.boot_seconds <= 0:
            problems.append(f"boot_seconds must be positive, got {self.boot_seconds}")
        if self.nodes < 1:
            problems.append(f"nodes must be at least 1, got {self.nodes}")
        if self.node_cpu < 1:
            problems.append(f"node_cpu must be at least 1, got {self.node_cpu}")
        try:
            if to_bytes(self.node_memory) <= 0:
                problems.append(f"node_memory must be positive, got {self.node_memory!r}")
        except QuantityError:
            problems.append(f"node_memory is not a quantity: {self.node_memory!r}")
        if not 0.0 <= self.boot_failure_rate <= 1.0:
            problems.append(
                f"boot_failure_rate must be within [0, 1], got {self.boot_failure_rate}"
            )
        if self.time_scale <= 0:
            problems.append(f"time_scale must be positive, got {self.time_scale}")
        if self.max_grace_seconds < 0:
            problems.append(f"max_grace_seconds must not be negative, got {self.max_grace_seconds}")
        if problems:
            raise ValueError("invalid simulation config: " + "; ".join(problems))


@dataclass(frozen=True)
class BootPlan:
    """One VMI's fate, fixed when it is created: durations in seconds, already scaled."""

    pod_create: float
    pod_start: float
    domain_start: float
    guest_services: float
    shutdown: float
    finalize: float
    fails: bool
    pod_uid: str
    mac_suffix: bytes


def draw_boot_plan(rng: random.Random, config: SimulationConfig, failure_rate: float) -> BootPlan:
    """Every VMI draws the same numbers in the same order, whatever the failure rate, so a
    seed always yields the same timings."""
    scale = config.time_scale
    slowdown = EMULATION_SLOWDOWN if config.emulation else 1.0
    boot = config.boot_seconds * _spread(rng, BOOT_SPREAD_SIGMA) * slowdown * scale
    guest = config.boot_seconds * GUEST_SERVICES_SHARE * _spread(rng, 0.3) * slowdown * scale
    fails_draw = rng.random()
    shutdown = rng.uniform(0.3, 0.6) * scale
    finalize = rng.uniform(0.1, 0.25) * scale
    pod_uid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    mac_suffix = bytes(rng.getrandbits(8) for _ in range(3))
    return BootPlan(
        pod_create=boot * POD_CREATE_SHARE,
        pod_start=boot * POD_START_SHARE,
        domain_start=boot * DOMAIN_START_SHARE,
        guest_services=guest,
        shutdown=shutdown,
        finalize=finalize,
        fails=fails_draw < failure_rate,
        pod_uid=pod_uid,
        mac_suffix=mac_suffix,
    )


def _spread(rng: random.Random, sigma: float) -> float:
    low, high = BOOT_FACTOR_RANGE
    for _ in range(20):
        factor = rng.lognormvariate(0.0, sigma)
        if low <= factor <= high:
            return factor
    return 1.0


def probe_delay(plan: BootPlan, probe: Obj, time_scale: float) -> float:
    """When the first passing probe lands, counted from the pod's start like the kubelet."""
    initial = max(0, int(probe.get("initialDelaySeconds") or 0)) * time_scale
    period = max(1, int(probe.get("periodSeconds") or DEFAULT_PROBE_PERIOD_SECONDS)) * time_scale
    needed = max(1, int(probe.get("successThreshold") or 1))
    up = plan.domain_start + plan.guest_services
    first = max(0, math.ceil((up - initial) / period - 1e-9))
    return initial + (first + needed - 1) * period
