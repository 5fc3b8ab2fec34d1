"""Cold-path overhead: what labvirt adds to a boot, next to the official Kubernetes client alone.

The whole system runs as its own processes (``labvirt sim``, ``api``, ``worker``, ``beat``) on
a private Redis; no warm pools, so every session goes cold. For each session, one at a time and
then a few at once, the simulator's timeline (``GET /_sim/timeline``: when each VMI's create
request arrived and when it first turned Ready, to the microsecond) splits the time to ready
into:

- request to create: from sending ``POST /v1/sessions`` (straight to the API) to the
  simulator receiving the session's first VMI create;
- ready to ready: from the session's last VMI turning Ready in the simulator to the session's
  ``ready`` transition in Redis, which the API answers from (its exact timestamp);
- the boot in between, which is the simulator's and not labvirt's.

In the same run, interleaved with the sessions, the official client alone creates the same VMI
(the ``ubuntu`` manifest under other labels) and watches it until Ready: its own overhead is
create call to create received plus Ready to its watcher seeing it, the floor of any client.
Target: labvirt's overhead (the two parts added up) under 100 ms p99.

The create path is profiled from the processes' own log lines (microsecond timestamps): the
API's request line (its handling time), the worker's task line (when the provision task ran)
and the simulator's timeline split it into reaching the API, the API's handling, the queue
(API answered to task started) and the task's work up to its create call. The API's share is
then profiled in-process (``benchmarks.api_create_profile``). A few warm-up cycles of each
kind run first and are not counted: the first task waits for the worker to begin consuming,
a start-up cost and not the cold path's.

    python -m benchmarks.cold_path_bench [--sessions 100] [--concurrency 1 4]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import requests
from kubernetes import client, watch

from benchmarks import api_create_profile
from benchmarks.percentiles import quantiles_ms
from benchmarks.process_logs import log_events, stamp
from shared.adapters.redis_server import EmbeddedRedis
from shared.adapters.session_store import RedisSessionStore
from shared.adapters.template_files import load_templates
from shared.domain.manifests import SESSION_LABEL, build_environment
from shared.domain.sessions import SessionState, new_ids
from shared.domain.user_data import new_environment_token
from tests.e2e.harness import FRONTEND_TOKEN, NAMESPACE, System, start_system

TARGET_P99_MS = 100.0
CLIENT_LABELS = {"bench": "cold-path-client"}  # not labvirt's: its informer ignores these
# The ubuntu template's 5 s readiness-probe delay, scaled to 0.5 s, and a ~0.2 s boot: the
# overhead does not depend on the boot, and a short one keeps the run short.
SIM_ARGS = ["--boot-seconds", "2", "--time-scale", "0.1"]
POLL_SECONDS = 0.025
WARM_UP_CYCLES = 3
API_PROFILE_CREATES = 300
TASK_SUCCEEDED = re.compile(r"Task labvirt\.provision\[[^\]]+\] succeeded in ([0-9.e-]+)s")


@dataclass
class Cycle:
    """One cold start: a labvirt session (``key``: its id) or a client VMI (its name)."""

    kind: str  # "labvirt" or "client"
    key: str
    sent: float  # wall clock just before the create call
    answered: float  # the create call returned
    seen_ready: float | None = None  # client: its watcher saw Ready (labvirt: from the store)


class ClientCycles:
    """The official client alone: create the VMI, watch it until Ready."""

    def __init__(self, system: System) -> None:
        self._system = system
        self._local = threading.local()
        template = load_templates(None)["ubuntu"]
        _, environment_id = new_ids()
        manifest = build_environment(
            template=template,
            environment_id=environment_id,
            namespace=NAMESPACE,
            session_id=None,
            environment_token=new_environment_token(),
        ).vmis[0]
        manifest["metadata"]["labels"] = dict(CLIENT_LABELS)
        self._manifest = manifest

    def _api(self) -> client.CustomObjectsApi:
        api = getattr(self._local, "api", None)
        if api is None:
            api = self._local.api = client.CustomObjectsApi(self._system.sim.api())
        return api

    def run(self, name: str) -> Cycle:
        api = self._api()
        body = json.loads(json.dumps(self._manifest))
        body["metadata"]["name"] = name
        sent = time.time()
        created = api.create_namespaced_custom_object(
            "kubevirt.io", "v1", NAMESPACE, "virtualmachineinstances", body
        )
        cycle = Cycle("client", name, sent, time.time())
        stream = watch.Watch()
        for event in stream.stream(
            api.list_namespaced_custom_object,
            "kubevirt.io",
            "v1",
            NAMESPACE,
            "virtualmachineinstances",
            field_selector=f"metadata.name={name}",
            resource_version=created["metadata"]["resourceVersion"],
            timeout_seconds=60,
        ):
            conditions = (event["object"].get("status") or {}).get("conditions") or []
            if any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
                cycle.seen_ready = time.time()
                stream.stop()
        return cycle


class LabvirtCycles:
    """A session through the real API, followed in Redis (what the API answers from)."""

    def __init__(self, system: System, store: RedisSessionStore) -> None:
        self._system = system
        self._store = store
        self._local = threading.local()

    def run(self, user: str) -> Cycle:
        http = getattr(self._local, "http", None)
        if http is None:
            http = self._local.http = requests.Session()
        sent = time.time()
        response = http.post(
            f"{self._system.api_url}/v1/sessions",
            json={"template": "ubuntu", "user": user},
            headers={"Authorization": f"Bearer {FRONTEND_TOKEN}"},
            timeout=10,
        )
        answered = time.time()
        if response.status_code != 201:
            raise AssertionError(f"create answered {response.status_code}: {response.text}")
        session_id = response.json()["id"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            session = self._store.get(session_id)
            if session is not None and session.state in (SessionState.READY, SessionState.FAILED):
                break
            time.sleep(POLL_SECONDS)
        return Cycle("labvirt", session_id, sent, answered)


def run_phase(
    labvirt: LabvirtCycles,
    client_cycles: ClientCycles,
    *,
    label: str,
    sessions: int,
    concurrency: int,
) -> list[Cycle]:
    """``sessions`` of each kind, interleaved, ``concurrency`` at a time."""
    jobs: list[Callable[[], Cycle]] = []
    for i in range(sessions):
        jobs.append(lambda i=i: client_cycles.run(f"client-{label}-{i}"))
        jobs.append(lambda i=i: labvirt.run(f"cold-path-{label}-{i}"))
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(lambda job: job(), jobs))


@dataclass
class Timeline:
    """The simulator's timeline entries: labvirt's by session, the client's by VMI name."""

    by_session: dict[str, list[dict[str, Any]]]
    by_name: dict[str, dict[str, Any]]

    @classmethod
    def read(cls, sim_url: str) -> Timeline:
        entries = requests.get(f"{sim_url}/_sim/timeline", timeout=30).json()["vmis"]
        by_session: dict[str, list[dict[str, Any]]] = {}
        by_name: dict[str, dict[str, Any]] = {}
        for entry in entries:
            session_id = entry["labels"].get(SESSION_LABEL)
            if session_id:
                by_session.setdefault(session_id, []).append(entry)
            else:
                by_name[entry["name"]] = entry
        return cls(by_session, by_name)


def create_path_profile(log_dir: Path, cycles: list[Cycle], timeline: Timeline) -> dict[str, Any]:
    """labvirt's request-to-create split by the API's and the worker's log lines."""
    api_done: dict[str, tuple[float, float]] = {}  # session: (request logged, handling seconds)
    for event in log_events(log_dir / "api.log"):
        session_id = event.get("session_id")
        if event.get("event") == "api.request" and event.get("method") == "POST" and session_id:
            api_done.setdefault(session_id, (stamp(event), event["ms"] / 1000))
    task_started: dict[str, float] = {}
    for event in log_events(log_dir / "worker.log"):
        match = TASK_SUCCEEDED.match(str(event.get("event", "")))
        session_id = event.get("session_id")
        if match and session_id:
            started = stamp(event) - float(match.group(1))
            task_started.setdefault(session_id, started)
    parts: dict[str, list[float]] = {
        "client_to_api": [],
        "api_handling": [],
        "api_logged_to_task_started": [],
        "task_started_to_create_received": [],
    }
    for cycle in cycles:
        entries = timeline.by_session.get(cycle.key)
        if cycle.kind != "labvirt" or not entries:
            continue
        if cycle.key not in api_done or cycle.key not in task_started:
            continue
        logged, handling = api_done[cycle.key]
        started = task_started[cycle.key]
        parts["client_to_api"].append(logged - handling - cycle.sent)
        parts["api_handling"].append(handling)
        # Below 0 when the task starts before the API has written its answer.
        parts["api_logged_to_task_started"].append(started - logged)
        parts["task_started_to_create_received"].append(
            min(e["createReceived"] for e in entries) - started
        )
    profile: dict[str, Any] = {"profiled": len(parts["api_handling"])}
    profile.update({f"{name}_ms": quantiles_ms(values) for name, values in parts.items()})
    return profile


def phase_figures(
    cycles: list[Cycle], timeline: Timeline, store: RedisSessionStore
) -> dict[str, Any]:
    by_session, by_name = timeline.by_session, timeline.by_name
    sessions = store.get_many([c.key for c in cycles if c.kind == "labvirt"])
    figures: dict[str, dict[str, list[float]]] = {
        "labvirt": {"to_create": [], "to_ready": [], "overhead": [], "boot": [], "answer": []},
        "client": {"to_create": [], "to_ready": [], "overhead": [], "boot": [], "answer": []},
    }
    not_ready = 0
    for cycle in cycles:
        if cycle.kind == "labvirt":
            entries = by_session.get(cycle.key, [])
            session = sessions.get(cycle.key)
            if session is None or session.state is not SessionState.READY or not entries:
                not_ready += 1
                continue
            done = next(t.at for t in session.history if t.state is SessionState.READY)
        else:
            entry = by_name.get(cycle.key)
            entries = [entry] if entry else []
            if cycle.seen_ready is None or not entries:
                not_ready += 1
                continue
            done = cycle.seen_ready
        if any(e["ready"] is None for e in entries):
            not_ready += 1
            continue
        received = min(e["createReceived"] for e in entries)
        vmis_ready = max(e["ready"] for e in entries)
        kind = figures[cycle.kind]
        kind["to_create"].append(received - cycle.sent)
        kind["to_ready"].append(done - vmis_ready)
        kind["overhead"].append(received - cycle.sent + done - vmis_ready)
        kind["boot"].append(vmis_ready - received)
        kind["answer"].append(cycle.answered - cycle.sent)
    report: dict[str, Any] = {"not_ready": not_ready}
    for kind, values in figures.items():
        report[kind] = {
            "measured": len(values["overhead"]),
            "create_sent_to_create_received_ms": quantiles_ms(values["to_create"]),
            "vmi_ready_to_ready_seen_ms": quantiles_ms(values["to_ready"]),
            "overhead_ms": quantiles_ms(values["overhead"]),
            "create_call_answered_ms": quantiles_ms(values["answer"]),
            "boot_p50_s": round(statistics.median(values["boot"]), 3) if values["boot"] else None,
        }
    labvirt_p99 = report["labvirt"]["overhead_ms"]["p99"]
    report["labvirt_meets_target"] = labvirt_p99 is not None and labvirt_p99 < TARGET_P99_MS
    return report


def run(sessions: int, concurrencies: list[int]) -> dict[str, Any]:
    vmis = 2 * (sessions * len(concurrencies) + WARM_UP_CYCLES)
    nodes = vmis // 8 + 5  # ubuntu asks for 2 of a node's 16 cores
    server = EmbeddedRedis().start()
    phases = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            system = start_system(
                server.url,
                Path(tmp),
                sim_args=[*SIM_ARGS, "--nodes", str(nodes)],
            )
            store = RedisSessionStore(redis.Redis.from_url(server.url))
            try:
                labvirt, client_cycles = LabvirtCycles(system, store), ClientCycles(system)
                run_phase(
                    labvirt, client_cycles, label="warm-up", sessions=WARM_UP_CYCLES, concurrency=1
                )
                for concurrency in concurrencies:
                    started = time.monotonic()
                    cycles = run_phase(
                        labvirt,
                        client_cycles,
                        label=f"c{concurrency}",
                        sessions=sessions,
                        concurrency=concurrency,
                    )
                    elapsed = time.monotonic() - started
                    timeline = Timeline.read(system.sim.url)
                    figures = phase_figures(cycles, timeline, store)
                    figures["labvirt"]["create_path"] = create_path_profile(
                        Path(tmp), cycles, timeline
                    )
                    api_states = {
                        system.session(c.key)["state"] for c in cycles if c.kind == "labvirt"
                    }
                    phases.append(
                        {
                            "concurrency": concurrency,
                            "sessions_per_kind": sessions,
                            "seconds": round(elapsed, 1),
                            "api_states": sorted(api_states),
                            **figures,
                        }
                    )
            finally:
                system.stop()
    finally:
        server.stop()
    return {
        "benchmark": "cold-path overhead, labvirt vs the official client",
        "sim_args": SIM_ARGS,
        "target_overhead_p99_ms": TARGET_P99_MS,
        "phases": phases,
        # Where the API's share goes (python -m benchmarks.api_create_profile).
        "api_create_profile": api_create_profile.profile(API_PROFILE_CREATES, top=8),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=100, help="per kind and per concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args(argv)
    report = run(args.sessions, args.concurrency)
    print(json.dumps(report, indent=2))
    complete = all(p["not_ready"] == 0 and p["api_states"] == ["ready"] for p in report["phases"])
    return 0 if complete else 1


if __name__ == "__main__":
    raise SystemExit(main())
