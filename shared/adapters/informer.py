"""One shared watch of labvirt's VMIs per region per process: list, then watch, then resume.

A worker follows thousands of booting environments without a thread or a watch each: the
informer keeps a cache of every labvirt VMI in the region and calls one handler with the VMIs of
an environment each time any of them changes. The handler decides what the change means (ready,
failed, gone); the informer only keeps the cache true.

- It lists, then watches from the list's ``resourceVersion``; every event (bookmarks included)
  moves the version on, so a stream that ends, or breaks, is resumed from there without a list.
- A 410 (the version fell out of the server's history) means list again. After a list the
  handler sees every environment, those that vanished meanwhile included (with no VMIs), so a
  missed event is made good by the list that follows.
- Failures back off with capped, jittered exponential delays (``shared.adapters.retrying``)
  that start over once a watch delivers.
- ``healthy`` (synced, and the last list or watch succeeded) is what the worker's region
  heartbeat reports (``shared.adapters.region_state``). After a failure the next watch is a
  short probe (``PROBE_SECONDS``), so a region that recovered is known healthy within seconds
  even when nothing changes in it; a long watch follows.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

import structlog

from shared.adapters.kube import Expired, KubeCluster, KubeError
from shared.adapters.retrying import Backoff, retry_budget
from shared.domain.manifests import ENVIRONMENT_LABEL, MANAGED_BY_SELECTOR
from shared.domain.vmi import Vmi, vmi_labels, vmi_name

log = structlog.get_logger(__name__)

# How long one watch request lasts before the server ends it and the informer resumes.
WATCH_SECONDS: Final = 240
# The first watch after a failure: short, so that its normal end soon confirms the API is back.
PROBE_SECONDS: Final = 5


@dataclass(frozen=True)
class EnvironmentChange:
    """The VMIs of one environment as they stand now (none: all of them are gone)."""

    region: str
    environment_id: str
    labels: Mapping[str, str]  # of its newest VMI, or of the last one seen before it went
    vmis: tuple[Vmi, ...]


Handler = Callable[[EnvironmentChange], None]


@dataclass
class InformerStats:
    lists: int = 0
    watches: int = 0
    expired: int = 0
    errors: int = 0
    events: int = 0
    handler_errors: int = 0


@dataclass
class _Cache:
    vmis: dict[str, Vmi] = field(default_factory=dict)
    by_environment: dict[str, set[str]] = field(default_factory=dict)
    labels: dict[str, Mapping[str, str]] = field(default_factory=dict)

    def put(self, vmi: Vmi) -> str | None:
        name = vmi_name(vmi)
        self.drop(name)
        environment_id = vmi_labels(vmi).get(ENVIRONMENT_LABEL)
        self.vmis[name] = vmi
        if environment_id:
            self.by_environment.setdefault(environment_id, set()).add(name)
            self.labels[environment_id] = vmi_labels(vmi)
        return environment_id

    def drop(self, name: str) -> str | None:
        old = self.vmis.pop(name, None)
        if old is None:
            return None
        environment_id = vmi_labels(old).get(ENVIRONMENT_LABEL)
        if environment_id:
            names = self.by_environment.get(environment_id)
            if names is not None:
                names.discard(name)
                if not names:
                    del self.by_environment[environment_id]
        return environment_id

    def environment(self, environment_id: str) -> tuple[Vmi, ...]:
        names = sorted(self.by_environment.get(environment_id, ()))
        return tuple(self.vmis[name] for name in names)


class VmiInformer:
    def __init__(
        self,
        cluster: KubeCluster,
        handler: Handler,
        *,
        selector: str = MANAGED_BY_SELECTOR,
        watch_seconds: int = WATCH_SECONDS,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.region = cluster.region
        self._cluster = cluster
        self._handler = handler
        self._selector = selector
        self._watch_seconds = watch_seconds
        self._backoff = backoff or Backoff(base=0.2, cap=10.0)
        self._rng = rng or random.Random()
        self._cache = _Cache()
        self._resource_version: str | None = None  # None: list before watching
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # True from a failed list or watch until one succeeds (a list, an event, a normal end).
        self._failing = True
        self.synced = threading.Event()
        self.stats = InformerStats()

    # -- running ----------------------------------------------------------------------------

    def start(self) -> None:
        """Follow the region in a daemon thread of its own."""
        self._thread = threading.Thread(
            target=self.run, name=f"informer-{self.region}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        """List and watch until stopped, backing off after failures."""
        failures = 0
        while not self._stopping.is_set():
            try:
                self.step()
                failures = 0
            except Exception as exc:  # noqa: BLE001 - a follower never dies; it backs off
                failures += 1
                self._failing = True
                self.stats.errors += 1
                delay = self._backoff.delay(
                    failures, self._rng, retry_after=getattr(exc, "retry_after", None)
                )
                log.warning(
                    "informer.interrupted",
                    region=self.region,
                    error=str(exc),
                    error_type=type(exc).__name__,
                    retry_in=round(delay, 2),
                )
                if not isinstance(exc, KubeError):
                    self._resource_version = None  # not a cluster error: trust nothing
                self._stopping.wait(delay)

    def step(self) -> None:
        """One list if the informer has no version to resume from, then one watch request."""
        if self._resource_version is None:
            self.relist()
        try:
            self._watch()
        except Expired:
            self.stats.expired += 1
            log.info("informer.expired", region=self.region)
            self._resource_version = None

    # -- what it does -----------------------------------------------------------------------

    def relist(self) -> None:
        """Replace the cache with a fresh list; tell the handler of every environment."""
        with retry_budget(0):  # the informer's own loop backs off: no retries inside it
            items, version = self._cluster.list_vmis(self._selector)
        self.stats.lists += 1
        before = set(self._cache.by_environment)
        old_labels = dict(self._cache.labels)
        self._cache = _Cache()
        for vmi in items:
            self._cache.put(vmi)
        self._resource_version = version
        self._failing = False
        self.synced.set()
        for environment_id in sorted(before | set(self._cache.by_environment)):
            labels = self._cache.labels.get(environment_id) or old_labels.get(environment_id, {})
            self._tell(environment_id, labels)

    def _watch(self) -> None:
        self.stats.watches += 1
        version = self._resource_version or ""
        seconds = min(PROBE_SECONDS, self._watch_seconds) if self._failing else self._watch_seconds
        for event_type, obj in self._cluster.watch_vmis(
            self._selector, version, timeout_seconds=seconds
        ):
            self._failing = False  # the server answered
            if self._stopping.is_set():
                return
            self._resource_version = (obj.get("metadata") or {}).get(
                "resourceVersion", self._resource_version
            )
            if event_type == "BOOKMARK":
                continue
            self.stats.events += 1
            if event_type == "DELETED":
                environment_id = self._cache.drop(vmi_name(obj))
                labels = vmi_labels(obj)
                environment_id = environment_id or labels.get(ENVIRONMENT_LABEL)
            else:
                environment_id = self._cache.put(obj)
                labels = vmi_labels(obj)
            if environment_id:
                self._tell(environment_id, labels)
        self._failing = False  # the server ended the stream: it is there

    @property
    def healthy(self) -> bool:
        """Synced, and the last list or watch succeeded: the region's API answers."""
        return self.synced.is_set() and not self._failing and not self._stopping.is_set()

    @property
    def stopped(self) -> bool:
        return self._stopping.is_set()

    def _tell(self, environment_id: str, labels: Mapping[str, str]) -> None:
        vmis = self._cache.environment(environment_id)
        if vmis:
            labels = vmi_labels(vmis[-1]) or labels
        change = EnvironmentChange(self.region, environment_id, dict(labels), vmis)
        try:
            self._handler(change)
        except Exception:  # one environment's trouble must not stop the others
            self.stats.handler_errors += 1
            log.exception("informer.handler_failed", environment_id=environment_id)

    def environment(self, environment_id: str) -> tuple[Vmi, ...]:
        """The cached VMIs of one environment."""
        return self._cache.environment(environment_id)

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"VmiInformer(region={self.region!r}, vmis={len(self._cache.vmis)})"
