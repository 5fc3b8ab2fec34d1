"""Cold starts at scale: N sessions created at once, every one booted cold, with a worker of
``LABVIRT_WORKER_CONCURRENCY=8`` threads.

The whole system runs as its own processes (``labvirt sim``, ``api``, ``worker``, ``beat``) on
a private Redis. A watch of this process's own records when each VMI was first seen and
when it became Ready, so labvirt's overhead is told apart from the simulated boot:

- request to create: from sending ``POST /v1/sessions`` to the session's first VMI being seen;
- ready to ready: from the last VMI of a session becoming Ready to the session's ``ready``
  transition (its history's timestamp);
- overhead: the two added up, i.e. time to ready minus the boot itself.

It also samples the simulator's open watch streams: one per region per worker process (plus
this benchmark's own), however many environments boot.

    python -m benchmarks.cold_start_bench --sessions 500 --boot-seconds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis
import requests
from kubernetes import client, watch

from benchmarks.percentiles import percentile
from shared.adapters.redis_server import EmbeddedRedis
from shared.adapters.session_store import RedisSessionStore
from tests.e2e.harness import NAMESPACE, System, start_system


class VmiClock:
    """When each labvirt VMI was first seen and first seen Ready, by this process's clock."""

    def __init__(self, system: System) -> None:
        self.added: dict[str, float] = {}
        self.ready: dict[str, float] = {}
        self.session_of: dict[str, str] = {}
        self._system = system
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        api = self._system.sim.api()
        custom = client.CustomObjectsApi(api)
        version = ""
        while not self._stop.is_set():
            stream = watch.Watch()
            for event in stream.stream(
                custom.list_namespaced_custom_object,
                "kubevirt.io",
                "v1",
                NAMESPACE,
                "virtualmachineinstances",
                label_selector="app.kubernetes.io/managed-by=labvirt",
                resource_version=version,
                timeout_seconds=5,
            ):
                now = time.time()
                obj = event["object"]
                metadata = obj["metadata"]
                version = metadata.get("resourceVersion", version)
                name = metadata["name"]
                self.added.setdefault(name, now)
                session = (metadata.get("labels") or {}).get("labvirt.io/session")
                if session:
                    self.session_of[name] = session
                conditions = (obj.get("status") or {}).get("conditions") or []
                if any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
                    self.ready.setdefault(name, now)


def run(sessions: int, boot_seconds: float, concurrency: int) -> dict[str, Any]:
    nodes = sessions // 8 + 5  # ubuntu asks for 2 of a node's 16 cores
    redis_server = EmbeddedRedis().start()
    with tempfile.TemporaryDirectory() as tmp:
        system = start_system(
            redis_server.url,
            Path(tmp),
            extra_env={
                "LABVIRT_WORKER_CONCURRENCY": str(concurrency),
                # Every session boots at once: the region's caps must let them all in.
                "LABVIRT_REGION_MAX_LIVE_SESSIONS": str(sessions),
                "LABVIRT_REGION_MAX_BOOTING": str(sessions),
            },
            sim_args=["--boot-seconds", str(boot_seconds), "--nodes", str(nodes)],
        )
        clock = VmiClock(system)
        clock.start()
        watch_streams: list[int] = []
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                stats = requests.get(f"{system.sim.url}/_sim/stats", timeout=5).json()
                watch_streams.append(stats["watchStreams"])
                sampling.wait(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            time.sleep(1)  # the informers and this watch are up
            asked: dict[str, float] = {}

            def create(i: int) -> None:
                started = time.time()
                body = system.create("ubuntu", f"cold-{i}")
                asked[body["id"]] = started

            began = time.time()
            with ThreadPoolExecutor(max_workers=32) as pool:
                list(pool.map(create, range(sessions)))
            accepted = time.time() - began
            done: dict[str, dict[str, Any]] = {}
            deadline = time.time() + 600
            while len(done) < sessions and time.time() < deadline:
                for session_id in [s for s in asked if s not in done]:
                    body = system.session(session_id)
                    if body["state"] in ("ready", "failed"):
                        done[session_id] = body
                time.sleep(0.5)
            all_ready = time.time() - began
            # The API rounds times to the second; the store keeps them exact.
            store = RedisSessionStore(redis.Redis.from_url(redis_server.url))
            ready_times = {
                session_id: next(t.at for t in session.history if t.state.value == "ready")
                for session_id, session in store.get_many(list(done)).items()
                if session.state.value == "ready"
            }
        finally:
            sampling.set()
            clock.stop()
            system.stop()
            redis_server.stop()

    vmis_of: dict[str, list[str]] = {}
    for name, session_id in clock.session_of.items():
        vmis_of.setdefault(session_id, []).append(name)
    to_create, to_ready, overhead, boots = [], [], [], []
    for session_id in done:
        names = vmis_of.get(session_id, [])
        if session_id not in ready_times or not names or any(n not in clock.ready for n in names):
            continue
        ready_at = ready_times[session_id]
        first_seen = min(clock.added[n] for n in names)
        vmis_ready = max(clock.ready[n] for n in names)
        to_create.append(first_seen - asked[session_id])
        to_ready.append(ready_at - vmis_ready)  # < 0: the worker saw it before this watch
        boots.append(vmis_ready - first_seen)
        overhead.append(to_create[-1] + to_ready[-1])
    ms = 1000.0
    return {
        "sessions": sessions,
        "worker_concurrency": concurrency,
        "sim_boot_seconds": boot_seconds,
        "ready": sum(1 for b in done.values() if b["state"] == "ready"),
        "failed": sum(1 for b in done.values() if b["state"] == "failed"),
        "measured": len(overhead),
        "seconds_to_accept_all": round(accepted, 2),
        "seconds_until_all_ready": round(all_ready, 2),
        "boot_p50_s": round(statistics.median(boots), 2) if boots else None,
        "request_to_first_vmi_ms": {
            "p50": round(percentile(to_create, 0.5) * ms),
            "p99": round(percentile(to_create, 0.99) * ms),
        },
        "vmis_ready_to_session_ready_ms": {
            "p50": round(percentile(to_ready, 0.5) * ms),
            "p99": round(percentile(to_ready, 0.99) * ms),
        },
        "overhead_ms": {
            "p50": round(percentile(overhead, 0.5) * ms),
            "p99": round(percentile(overhead, 0.99) * ms),
        },
        # Two worker processes (provision, prewarm) and this benchmark's watch.
        "max_open_watch_streams": max(watch_streams) if watch_streams else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=500)
    parser.add_argument("--boot-seconds", type=float, default=5.0)
    parser.add_argument("--worker-concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    runs = [
        run(args.sessions, args.boot_seconds, args.worker_concurrency) for _ in range(args.repeats)
    ]
    medians = {
        figure: {
            quantile: statistics.median(r[figure][quantile] for r in runs)
            for quantile in ("p50", "p99")
        }
        for figure in ("request_to_first_vmi_ms", "vmis_ready_to_session_ready_ms", "overhead_ms")
    }
    print(json.dumps({"runs": runs, "medians": medians}, indent=2))
    return 0 if all(r["ready"] == args.sessions for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
