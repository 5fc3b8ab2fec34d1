"""The series a process records as it works, built once per process on first use.

In multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set by the entry point, see
``shared.metrics.multiprocess``) the metrics belong to no registry: their values go to the
directory's files and a scrape merges those. Otherwise they are registered in this process's
registry, beside the process's own CPU, memory and file descriptor series.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Final

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
)

from shared.metrics.multiprocess import MULTIPROCESS_ENV

# From a warm claim (milliseconds) to a slow cold boot of a two-VM template (minutes).
READY_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300)
# Creating an environment's objects: a few API calls, seconds when the cluster is slow.
PROVISIONING_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass(frozen=True)
class Series:
    session_requests: Counter
    time_to_ready: Histogram
    provisioning_duration: Histogram
    provisioning_failures: Counter
    kube_calls: Counter
    sessions_ended: Counter
    dead_letters_recorded: Counter
    orphans_deleted: Counter


def multiprocess_dir() -> str | None:
    """The directory this process writes its values to, when in multiprocess mode."""
    return os.environ.get(MULTIPROCESS_ENV) or None


class _Process:
    """This process's series and registry, made on first use (a lock: threads record too)."""

    lock = threading.Lock()
    registry: CollectorRegistry | None = None
    series: Series | None = None


def process_registry() -> CollectorRegistry:
    """The registry of a process not in multiprocess mode: its series and its process's."""
    with _Process.lock:
        if _Process.registry is None:
            registry = CollectorRegistry(auto_describe=True)
            for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                registry.register(collector)
            _Process.registry = registry
        return _Process.registry


def series() -> Series:
    """This process's series, built on the first call."""
    if _Process.series is None:
        registry = None if multiprocess_dir() else process_registry()
        with _Process.lock:
            if _Process.series is None:
                _Process.series = _build(registry)
    return _Process.series


def _build(registry: CollectorRegistry | None) -> Series:
    return Series(
        session_requests=Counter(
            "labvirt_session_requests",
            "Session creates by outcome: warm, cold, reconnected, rejected (reason: the "
            "problem code) or failed",
            ["template", "region", "outcome", "reason"],
            registry=registry,
        ),
        time_to_ready=Histogram(
            "labvirt_session_time_to_ready_seconds",
            "From a session's creation to ready, by path: warm (a claim) or cold (a boot)",
            ["template", "region", "path"],
            buckets=READY_BUCKETS,
            registry=registry,
        ),
        provisioning_duration=Histogram(
            "labvirt_provisioning_duration_seconds",
            "How long a provision took to create an environment's objects in its cluster",
            ["template", "region"],
            buckets=PROVISIONING_BUCKETS,
            registry=registry,
        ),
        provisioning_failures=Counter(
            "labvirt_provisioning_failures",
            "Sessions that failed before they were ready, by reason",
            ["template", "region", "reason"],
            registry=registry,
        ),
        kube_calls=Counter(
            "labvirt_kube_calls",
            "Kubernetes API calls (each attempt) by verb and answer: 2xx, the HTTP status of "
            "an error, or unreachable",
            ["region", "verb", "code"],
            registry=registry,
        ),
        sessions_ended=Counter(
            "labvirt_sessions_ended",
            "Sessions that reached a final state (ended or failed), by reason",
            ["template", "region", "state", "reason"],
            registry=registry,
        ),
        dead_letters_recorded=Counter(
            "labvirt_dead_letters_recorded",
            "Tasks recorded as failed for good, by task",
            ["task"],
            registry=registry,
        ),
        orphans_deleted=Counter(
            "labvirt_orphans_deleted",
            "Environments nobody owned that the reconciler deleted",
            ["region"],
            registry=registry,
        ),
    )
