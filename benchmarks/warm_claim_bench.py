"""Warm claims: ``POST /v1/sessions`` answered from a warm pool, against the floor of a bare
Flask app doing one Redis call, served with the same gunicorn settings, in the same run.

For each gunicorn setting (``--serving 1x32,2x32``: worker processes x threads) and each
repeat, side by side on one private ``redis-server``:

1. the baseline (``benchmarks.baseline_app``): Flask, one ``INCR`` per request;
2. the API (``labvirt api``, this checkout) in front of a pool of warm ubuntu environments
   filled straight through the pool store (ready records, refills paused: no worker, no
   simulator; the claims' relabel tasks stay queued in Redis);
3. with ``--before DIR``, the API of another checkout (an earlier version) the same way.

The load is ``--clients`` threads, each on one keep-alive connection, sending ``--requests``
POSTs in all (each claim a new learner) after an unmeasured warm-up. Reported per target:
requests/s, p50 and p99, the API's ratio to the baseline, and the worker processes seen;
medians of the repeats. After every API run each answer is checked against Redis: every
session ready and warm, no environment handed to two sessions, each environment's record
naming its session.

``--profile`` instead runs claims through the app in this process (Flask's test client, the
real Redis) under cProfile, and counts Redis round trips and commands per claim, with where
each round trip comes from.

    python -m benchmarks.warm_claim_bench [--requests 2000] [--repeats 3] [--serving 1x32,2x32]
        [--before DIR] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import http.client
import inspect
import io
import itertools
import json
import os
import pstats
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import redis

from shared.adapters.pool_records import environment_key
from shared.adapters.pool_store import RedisPoolStore
from shared.adapters.redis_server import EmbeddedRedis, free_port
from shared.adapters.session_store import RedisSessionStore
from shared.adapters.template_files import load_templates
from shared.config import available_cpus
from shared.domain.pools.config import PoolKey
from shared.domain.pools.environments import new_warm_environment
from shared.domain.sessions import SessionState, VmView

ROOT = Path(__file__).resolve().parents[1]
REGION = "local"
TEMPLATE = "ubuntu"
WARM_UP = 100
FILL_BATCH = 500
PLENTY = "1000000"
COMMAND = "python -m benchmarks.warm_claim_bench"


@dataclass(frozen=True)
class Serving:
    """gunicorn's worker processes and threads per worker."""

    workers: int
    threads: int

    @classmethod
    def parse(cls, text: str) -> Serving:
        workers, _, threads = text.partition("x")
        return cls(int(workers), int(threads))

    def __str__(self) -> str:
        return f"{self.workers}x{self.threads}"


@dataclass
class Load:
    """What one target answered: latencies (s), wall time, and every answer's status and body."""

    latencies: list[float]
    elapsed: float
    answers: list[tuple[int, bytes]]

    def figures(self) -> dict[str, float]:
        ordered = sorted(self.latencies)
        return {
            "per_second": round(len(ordered) / self.elapsed, 1),
            "p50_ms": round(_percentile(ordered, 0.50) * 1000, 2),
            "p99_ms": round(_percentile(ordered, 0.99) * 1000, 2),
        }


def _percentile(ordered: list[float], fraction: float) -> float:
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


# -- the load -------------------------------------------------------------------------------


def send(
    port: int, path: str, bodies: Sequence[bytes], *, headers: dict[str, str], clients: int
) -> Load:
    """POST every body once, from ``clients`` threads on one keep-alive connection each."""
    order = itertools.count()  # next() on it is atomic under the GIL
    latencies: list[float] = []
    answers: list[tuple[int, bytes]] = [(0, b"")] * len(bodies)
    start = threading.Barrier(clients + 1)
    failures: list[BaseException] = []

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine: list[float] = []
        start.wait()
        try:
            while (i := next(order)) < len(bodies):
                began = time.perf_counter()
                connection.request("POST", path, body=bodies[i], headers=headers)
                response = connection.getresponse()
                answers[i] = (response.status, response.read())
                mine.append(time.perf_counter() - began)
        except Exception as exc:  # noqa: BLE001 - reported below, with the run
            failures.append(exc)
        finally:
            connection.close()
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    if failures:
        raise RuntimeError(f"the load client failed: {failures[0]!r}") from failures[0]
    return Load(latencies, elapsed, answers)


def claim_bodies(prefix: str, count: int) -> list[bytes]:
    """One create per new learner (a learner holds one session at a time)."""
    return [
        json.dumps({"template": TEMPLATE, "user": f"{prefix}-{i}"}).encode() for i in range(count)
    ]


# -- the processes --------------------------------------------------------------------------


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def worker_processes(self) -> int:
        return len(psutil.Process(self.process.pid).children())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def serve(argv: list[str], env: dict[str, str], *, cwd: Path, port: int, log: Path) -> Served:
    with log.open("wb") as handle:
        process = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    served = Served(process, port, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{argv} exited:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            connection.request("GET", "/readyz" if "api" in argv else "/healthz")
            if connection.getresponse().status == 200:
                return served
        except OSError:
            pass
        time.sleep(0.1)
    served.stop()
    raise RuntimeError(f"{argv} did not answer within 60 s")


def api_environment(redis_url: str, port: int, serving: Serving, token: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the checkout run is the working directory's
    env.update(
        {
            "REDIS_URL": redis_url,
            "LABVIRT_MODE": "production",
            "LABVIRT_FRONTEND_TOKENS": token,
            "LABVIRT_ADMIN_TOKENS": secrets.token_hex(16),
            "LABVIRT_API_HOST": "127.0.0.1",
            "LABVIRT_API_PORT": str(port),
            "LABVIRT_API_WORKERS": str(serving.workers),
            "LABVIRT_API_THREADS": str(serving.threads),
            # Every limit is checked on every create, as in production; none may refuse one.
            "LABVIRT_LIMIT_CREATES_PER_USER": "10/minute",
            "LABVIRT_LIMIT_CREATES_PER_FRONTEND_TOKEN": f"{PLENTY}/minute",
            "LABVIRT_REGION_MAX_LIVE_SESSIONS": PLENTY,
            "LABVIRT_REGION_MAX_BOOTING": PLENTY,
            "LABVIRT_LOG_LEVEL": "INFO",
        }
    )
    return env


# -- the pool and the check -----------------------------------------------------------------


def fill_pool(client: redis.Redis, count: int) -> None:
    """``count`` ready environments of the pool, as a prewarmer would leave them; refills
    paused (nothing would boot them anyway: no worker runs)."""
    template = load_templates(None)[TEMPLATE]
    store = RedisPoolStore(client)
    store.set_globally_paused(True)
    key = PoolKey(REGION, TEMPLATE)
    now = time.time()
    for first in range(0, count, FILL_BATCH):
        batch = [
            new_warm_environment(key=key, now=now)
            for _ in range(first, min(count, first + FILL_BATCH))
        ]
        reserved = store.reserve(key, batch, ceiling=count, max_in_flight=count)
        for n, env in enumerate(reserved, start=first):
            vms = [
                VmView(
                    vm.name, vm.hostname, f"10.244.{n // 250}.{n % 250 + 2}", "Running", ready=True
                )
                for vm in template.vms
            ]
            if not store.mark_ready(key, env.id, vms=vms, at=now):
                raise RuntimeError(f"environment {env.id} could not be marked ready")


def check_exactly_once(client: redis.Redis, answers: Sequence[tuple[int, bytes]]) -> dict[str, Any]:
    """Every answer a 201 with a ready warm session; no environment handed out twice; every
    environment's record names the session that holds it."""
    statuses = Counter(status for status, _ in answers)
    if set(statuses) != {201}:
        raise AssertionError(
            f"not every create was a 201: {dict(statuses)}; {answers[0][1][:300]!r}"
        )
    ids = [json.loads(body)["id"] for _, body in answers]
    sessions = RedisSessionStore(client).get_many(ids)
    if len(sessions) != len(ids) or len(set(ids)) != len(ids):
        raise AssertionError(f"{len(ids)} answers, {len(set(ids))} ids, {len(sessions)} stored")
    not_ready = [s.id for s in sessions.values() if s.state is not SessionState.READY or not s.warm]
    if not_ready:
        raise AssertionError(f"sessions not ready and warm: {not_ready[:5]}")
    environments = Counter(s.environment_id for s in sessions.values())
    shared = [env for env, n in environments.items() if n > 1]
    if shared:
        raise AssertionError(f"environments handed to two sessions: {shared[:5]}")
    pipe = client.pipeline(transaction=False)
    for session in sessions.values():
        pipe.hget(environment_key(PoolKey(REGION, TEMPLATE), session.environment_id), "session_id")
    holders = [h.decode() if h else None for h in pipe.execute()]
    wrong = [s.id for s, h in zip(sessions.values(), holders, strict=True) if h != s.id]
    if wrong:
        raise AssertionError(f"environment records naming another session: {wrong[:5]}")
    return {"sessions": len(ids), "ready_and_warm": len(ids), "environments_shared": 0}


# -- one measurement ------------------------------------------------------------------------


def measure_baseline(
    redis_url: str, serving: Serving, work: Path, *, requests: int, clients: int
) -> dict[str, Any]:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "benchmarks.baseline_app",
        "--redis-url",
        redis_url,
        "--port",
        str(port),
    ]
    argv += ["--workers", str(serving.workers), "--threads", str(serving.threads)]
    served = serve(argv, dict(os.environ), cwd=ROOT, port=port, log=work / "baseline.log")
    try:
        headers = {"Content-Type": "application/json"}
        send(port, "/incr", claim_bodies("warm-up", WARM_UP), headers=headers, clients=clients)
        load = send(
            port, "/incr", claim_bodies("bench", requests), headers=headers, clients=clients
        )
        if {status for status, _ in load.answers} != {201}:
            raise AssertionError("the baseline failed requests")
        return {**load.figures(), "worker_processes": served.worker_processes()}
    finally:
        served.stop()


def measure_api(
    redis_url: str,
    serving: Serving,
    work: Path,
    *,
    source: Path,
    requests: int,
    clients: int,
    label: str,
) -> dict[str, Any]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    fill_pool(client, WARM_UP + requests)
    port = free_port()
    token = f"bench-{secrets.token_hex(16)}"
    env = api_environment(redis_url, port, serving, token)
    argv = [sys.executable, "-m", "labvirt.cli", "api"]
    served = serve(argv, env, cwd=source, port=port, log=work / f"api-{label}.log")
    try:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        send(
            port,
            "/v1/sessions",
            claim_bodies(f"warm-up-{label}", WARM_UP),
            headers=headers,
            clients=clients,
        )
        load = send(
            port,
            "/v1/sessions",
            claim_bodies(f"bench-{label}", requests),
            headers=headers,
            clients=clients,
        )
        checked = check_exactly_once(client, load.answers)
        return {**load.figures(), "worker_processes": served.worker_processes(), "check": checked}
    finally:
        served.stop()
        client.close()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    servings = [Serving.parse(s) for s in args.serving.split(",")]
    targets = ["baseline", "api"] + (["api_before"] if args.before else [])
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        str(s): {t: [] for t in targets} for s in servings
    }
    for repeat in range(args.repeats):
        for serving in servings:
            server = EmbeddedRedis().start()
            try:
                with tempfile.TemporaryDirectory(prefix="labvirt-warm-bench-") as tmp:
                    work = Path(tmp)
                    found = runs[str(serving)]
                    load = {"requests": args.requests, "clients": args.clients}
                    found["baseline"].append(measure_baseline(server.url, serving, work, **load))
                    found["api"].append(
                        measure_api(server.url, serving, work, source=ROOT, label="api", **load)
                    )
                    if args.before:
                        found["api_before"].append(
                            measure_api(
                                server.url,
                                serving,
                                work,
                                source=Path(args.before),
                                label="before",
                                **load,
                            )
                        )
            finally:
                server.stop()
            print(f"repeat {repeat + 1}/{args.repeats} {serving} done", file=sys.stderr, flush=True)
    return {str(s): summarise(runs[str(s)]) for s in servings}


def summarise(found: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    medians = {
        target: {
            k: statistics.median(r[k] for r in results) for k in ("per_second", "p50_ms", "p99_ms")
        }
        for target, results in found.items()
    }
    ratios = {
        target: [
            round(r["per_second"] / b["per_second"], 3)
            for r, b in zip(found[target], found["baseline"], strict=True)
        ]
        for target in found
        if target != "baseline"
    }
    return {
        "runs": found,
        "medians": medians,
        "ratio_to_baseline": {
            t: {"runs": r, "median": statistics.median(r)} for t, r in ratios.items()
        },
        "target_met": {
            t: statistics.median(r) >= 0.5 and medians[t]["p99_ms"] < 25 for t, r in ratios.items()
        },
    }


# -- the profile ----------------------------------------------------------------------------


@contextmanager
def counting_round_trips() -> Iterator[Counter[str]]:
    """Every write of commands to Redis (one round trip: a command, or a whole pipeline), by
    the labvirt function that caused it."""
    origins: Counter[str] = Counter()
    original = redis.connection.AbstractConnection.send_packed_command

    def counted(self: Any, command: Any, check_health: bool = True) -> None:
        origins[_origin()] += 1
        original(self, command, check_health)

    redis.connection.AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]
    try:
        yield origins
    finally:
        redis.connection.AbstractConnection.send_packed_command = original  # type: ignore[method-assign]


def _origin() -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = Path(frame.filename)
        inside = ROOT in path.parents and not {"benchmarks", ".venv"} & set(path.parts)
        if inside:
            return f"{path.relative_to(ROOT)}:{frame.name}"
    return "celery/kombu"


def profile(args: argparse.Namespace) -> dict[str, Any]:
    """Claims through the app in this process: time, round trips and commands per claim."""
    from services.api.app import create_app  # noqa: PLC0415 - only the profile needs the app
    from shared.config import Settings  # noqa: PLC0415
    from shared.logging import configure_logging  # noqa: PLC0415
    from shared.runtime import build_runtime  # noqa: PLC0415

    server = EmbeddedRedis().start()
    try:
        client = redis.Redis.from_url(server.url)
        count = args.requests
        fill_pool(client, 3 * count + WARM_UP)
        token = f"bench-{secrets.token_hex(16)}"
        settings = Settings.from_env(api_environment(server.url, 0, Serving(1, 1), token))
        saved, sys.stderr = sys.stderr, open(os.devnull, "w")  # noqa: SIM115 - the logs' sink
        try:
            configure_logging(settings, process="api")
        finally:
            sys.stderr = saved
        # As ``labvirt api`` builds it (a checkout from before direct publishing has no flag).
        direct = "publish_directly" in inspect.signature(build_runtime).parameters
        app = create_app(build_runtime(settings, **({"publish_directly": True} if direct else {})))
        http = app.test_client()
        headers = {"Authorization": f"Bearer {token}"}

        def claims(prefix: str, n: int) -> Callable[[], None]:
            def run() -> None:
                for i in range(n):
                    answer = http.post(
                        "/v1/sessions",
                        json={"template": TEMPLATE, "user": f"{prefix}-{i}"},
                        headers=headers,
                    )
                    if answer.status_code != 201:
                        raise AssertionError(answer.get_data(as_text=True))

            return run

        claims("warm-up", WARM_UP)()
        began, cpu_began = time.perf_counter(), time.process_time()
        claims("timed", count)()
        ms_per_claim = (time.perf_counter() - began) * 1000 / count
        cpu_ms_per_claim = (time.process_time() - cpu_began) * 1000 / count
        commands_before = int(client.info("stats")["total_commands_processed"])
        with counting_round_trips() as origins:
            claims("counted", count)()
        commands = int(client.info("stats")["total_commands_processed"]) - commands_before - 1
        profiler = cProfile.Profile()
        profiler.runcall(claims("profiled", count))
        report = io.StringIO()
        stats = pstats.Stats(profiler, stream=report).strip_dirs()
        for order in ("cumulative", "tottime"):
            stats.sort_stats(order).print_stats(args.profile_lines)
        print(report.getvalue(), file=sys.stderr)
        return {
            "claims": count,
            "ms_per_claim_in_process": round(ms_per_claim, 3),
            "cpu_ms_per_claim_in_process": round(cpu_ms_per_claim, 3),
            "round_trips_per_claim": round(sum(origins.values()) / count, 2),
            "commands_per_claim": round(commands / count, 2),
            "round_trips_by_origin": {k: round(v / count, 2) for k, v in origins.most_common()},
        }
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--serving", default=f"1x32,{available_cpus()}x32")
    parser.add_argument("--before", default=None, help="another checkout's API, measured beside")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-lines", type=int, default=40)
    args = parser.parse_args(argv)
    if args.profile:
        print(json.dumps({"profile": profile(args)}, indent=2))
        return 0
    report = {"clients": args.clients, "requests": args.requests, "load_average": os.getloadavg()}
    report["servings"] = measure(args)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
