"""Reconciler pass cost against the number of live sessions: 1,000, 10,000 and 100,000.

A pass compares everything (every session of the region in Redis with every labvirt VMI of the
region's cluster), so unlike the reaper's tick it must grow with N; this measures how. It runs
the real pass (``services.reaper.reconciler.Reconciler.reconcile``, what ``labvirt.reconcile``
runs per region) in steady state: every session ready, its environment's VMIs present, Ready
and annotated as the provisioner annotates them, so the pass finds nothing to do (checked: a
pass that changes anything fails the benchmark).

- Redis: a real, private redis-server (one database per size), the sessions written with the
  store's own encoding and indexes, and an empty pool store.
- Cluster: a fake cluster port holding N VMIs, not a simulator. Each VMI is what the
  provisioner creates (``build_environment`` with the session's annotations) with the status
  the simulator's own KubeVirt controllers give a booted ``ubuntu`` VMI (booted once on a fake
  clock). The port keeps them as JSON pages of 500, as the API serves them, and decodes every
  page on every list, as the official client does; HTTP and the API server's own work are left
  out (the simulator's paged list is itself O(N) per page, which would measure the simulator).

Passes on the three sizes alternate, so drift on the machine hits all alike; the report gives
medians, the share of the list and of Python's cyclic garbage collector in each (a pass makes
millions of objects), and the ratio of the largest to the smallest.

    python -m benchmarks.reconciler_bench [--sessions 1000 10000 100000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import statistics
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import redis
import structlog

from labvirt.sim.app import Settings, build_simulator
from labvirt.sim.clock import FakeScheduler
from labvirt.sim.vmi import VMI
from services.reaper.reconciler import Reconciler
from shared.adapters.pool_store import RedisPoolStore
from shared.adapters.redis_server import EmbeddedRedis
from shared.adapters.session_events import SessionEvents
from shared.adapters.session_store import RedisSessionStore, _encode, session_key
from shared.adapters.template_files import load_templates
from shared.domain.lifecycle import clocks_for, start_session
from shared.domain.manifests import build_environment
from shared.domain.recovery import session_annotations
from shared.domain.retries import with_environment_created
from shared.domain.sessions import Session
from shared.domain.templates import Template
from shared.domain.vmi import Vmi, as_vmi
from shared.domain.vmi_status import vm_views
from shared.jobs import TaskQueue
from shared.session_life import SessionLife

NOW = 1_700_000_000.0
REGION = "local"
NAMESPACE = "default"
PAGE = 500  # KubeCluster.list_vmis asks for pages of this size
LOAD_CHUNK = 2_000


def booted_status(template: Template) -> dict[str, Any]:
    """The status the simulator's controllers give a booted VMI of ``template``."""
    scheduler = FakeScheduler(start=NOW)
    simulator = build_simulator(Settings(nodes=1, seed=1), scheduler)
    session, _ = _session(template, 0)
    manifest = _environment(template, session)[0]
    simulator.store.create(VMI, NAMESPACE, manifest)
    scheduler.advance(600)
    booted = simulator.store.get(VMI, NAMESPACE, manifest["metadata"]["name"])
    return dict(booted["status"])


def _session(template: Template, i: int) -> tuple[Session, str]:
    return start_session(
        user=f"learner{i}",
        template=template.name,
        region=REGION,
        clocks=clocks_for(template),
        now=NOW,
    )


def _environment(template: Template, session: Session) -> list[dict[str, Any]]:
    manifests = build_environment(
        template=template,
        environment_id=session.environment_id,
        namespace=NAMESPACE,
        session_id=session.id,
        environment_token=session.environment_token,
        extra_annotations=session_annotations(session),
    )
    return [dict(vmi) for vmi in manifests.vmis]


@dataclass
class FakeCluster:
    """The cluster port the reconciler lists from: VMIs as JSON pages, decoded per list."""

    pages: list[bytes]
    namespace: str = NAMESPACE
    writes: list[str] = field(default_factory=list)
    list_seconds: list[float] = field(default_factory=list)

    def list_vmis(self, selector: str) -> tuple[list[Vmi], str]:
        del selector  # every VMI here is labvirt's
        started = time.perf_counter()
        items: list[Vmi] = []
        for page in self.pages:
            items.extend(as_vmi(item) for item in json.loads(page)["items"])
        self.list_seconds.append(time.perf_counter() - started)
        return items, "1"

    def patch_vmi(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.writes.append(f"patch {name}")
        return {"metadata": {"name": name}, **patch}

    def delete_vmis(self, selector: str) -> None:
        self.writes.append(f"delete vmis {selector}")

    def delete_vmi(self, name: str) -> None:
        self.writes.append(f"delete vmi {name}")

    def delete_services(self, selector: str) -> None:
        self.writes.append(f"delete services {selector}")

    def delete_network_policies(self, selector: str) -> None:
        self.writes.append(f"delete network policies {selector}")


class _NoCelery:
    """The Celery port: a steady-state pass queues nothing; anything queued is recorded."""

    conf = SimpleNamespace(task_routes={})  # no routes: every task goes through send_task

    def __init__(self) -> None:
        self.sent: list[str] = []

    def send_task(self, name: str, **_: Any) -> None:
        self.sent.append(name)


@dataclass
class World:
    """One size: its Redis database, its cluster and the reconciler over both."""

    sessions: int
    client: redis.Redis
    cluster: FakeCluster
    reconciler: Reconciler
    celery: _NoCelery
    load_seconds: float
    pass_seconds: list[float] = field(default_factory=list)
    gc_seconds: list[float] = field(default_factory=list)


def build_world(
    count: int, client: redis.Redis, template: Template, status: dict[str, Any]
) -> World:
    started = time.perf_counter()
    store = RedisSessionStore(client)
    vmis: list[dict[str, Any]] = []
    for start in range(0, count, LOAD_CHUNK):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(count, start + LOAD_CHUNK)):
            session, _ = _session(template, i)
            environment = _environment(template, session)
            for vmi in environment:
                vmi["metadata"]["creationTimestamp"] = "2023-11-14T22:13:20Z"
                vmi["status"] = status
            created = with_environment_created(session, environment_id=session.environment_id)
            ready = created.mark_ready(vms=vm_views(template, environment), at=NOW + 20)
            pipe.set(session_key(ready.id), _encode(ready))
            store._index(pipe, ready)  # a bulk load: the store has no public API for it
            vmis.extend(environment)
        pipe.execute()
    pages = [json.dumps({"items": vmis[i : i + PAGE]}).encode() for i in range(0, len(vmis), PAGE)]
    cluster = FakeCluster(pages)
    celery = _NoCelery()
    life = SessionLife(
        store=store,
        events=SessionEvents(client),
        queue=TaskQueue(celery),  # type: ignore[arg-type]
    )
    reconciler = Reconciler(
        life=life,
        templates=load_templates(None),
        cluster_for=lambda _region: cluster,  # type: ignore[arg-type, return-value]
        pools=RedisPoolStore(client),
    )
    return World(count, client, cluster, reconciler, celery, time.perf_counter() - started)


class GcClock:
    """Time spent in Python's cyclic garbage collector (``gc.callbacks``) while it runs."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0

    def __call__(self, phase: str, _info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started

    def __enter__(self) -> GcClock:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *_: object) -> None:
        gc.callbacks.remove(self)


def reconcile_once(world: World) -> float:
    started = time.perf_counter()
    with GcClock() as collector:
        report = world.reconciler.reconcile(REGION, now=NOW + 60)
    elapsed = time.perf_counter() - started
    world.gc_seconds.append(collector.seconds)
    if report.changed or world.cluster.writes or world.celery.sent:
        raise AssertionError(
            f"a steady-state pass over {world.sessions} sessions changed something: "
            f"{report.counts()}, {world.cluster.writes[:5]}, {world.celery.sent[:5]}"
        )
    return elapsed


def run(sizes: list[int], *, repeats: int) -> dict[str, Any]:
    template = load_templates(None)["ubuntu"]
    status = booted_status(template)
    server = EmbeddedRedis().start()
    worlds: list[World] = []
    try:
        for db, count in enumerate(sizes):
            client = redis.Redis.from_url(server.url.rsplit("/", 1)[0] + f"/{db}")
            worlds.append(build_world(count, client, template, status))
        for round_ in range(repeats + 1):  # one warm-up round, not counted
            for world in worlds:
                elapsed = reconcile_once(world)
                if round_ == 0:
                    world.cluster.list_seconds.clear()
                    world.gc_seconds.clear()
                else:
                    world.pass_seconds.append(elapsed)
        results = [
            {
                "sessions": world.sessions,
                "vmis": world.sessions * len(template.vms),
                "passes": len(world.pass_seconds),
                "median_ms": round(statistics.median(world.pass_seconds) * 1000, 1),
                "min_ms": round(min(world.pass_seconds) * 1000, 1),
                "max_ms": round(max(world.pass_seconds) * 1000, 1),
                "median_list_ms": round(statistics.median(world.cluster.list_seconds) * 1000, 1),
                "median_gc_ms": round(statistics.median(world.gc_seconds) * 1000, 1),
                "per_session_us": round(
                    statistics.median(world.pass_seconds) / world.sessions * 1e6, 1
                ),
                "load_seconds": round(world.load_seconds, 1),
            }
            for world in worlds
        ]
    finally:
        for world in worlds:
            world.client.close()
        server.stop()
    smallest, largest = results[0], results[-1]
    return {
        "benchmark": "reconciler pass vs live sessions (fake cluster port, JSON-decoded lists)",
        "python": platform.python_version(),
        "results": results,
        "ratio_median_largest_to_smallest": round(largest["median_ms"] / smallest["median_ms"], 1),
        "size_ratio": largest["sessions"] / smallest["sessions"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    report = run(sorted(args.sessions), repeats=args.repeats)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
