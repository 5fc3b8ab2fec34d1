"""Running the whole system as separate processes: simulator, API, worker and beat.

Real Redis, real Celery worker and beat processes, the simulator over HTTP and the official
Kubernetes client: nothing in-process, nothing eager.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml
from kubernetes import client, config

from shared.adapters.redis_server import free_port

# Strong enough for the start-up check (shaped as `secrets.token_hex(16)` makes them).
FRONTEND_TOKEN = "e2e-frontend-1679091c5a880faf6fb5e6087eb1b2dc"
ADMIN_TOKEN = "e2e-admin-8f14e45fceea167a5a36dedd4bea2543"
SCRAPE_TOKEN = "e2e-scrape-c4ca4238a0b923820dcc509a6f75849b"
NAMESPACE = "default"
SHORT_LIFETIME_SECONDS = 6
E2E_RATE_LIMITS = {
    "LABVIRT_LIMIT_CREATES_PER_USER": "100000/minute",
    "LABVIRT_LIMIT_CREATES_PER_FRONTEND_TOKEN": "100000/minute",
    "LABVIRT_LIMIT_BROWSER_PER_IP": "100000/minute",
}
# Region caps and pool budget for the tests' loads (the defaults suit a small installation);
# set in the environment, they win (`make pool-load` raises them for its 500 creates).
E2E_REGION_LIMITS = {
    "LABVIRT_REGION_MAX_LIVE_SESSIONS": "1000",
    "LABVIRT_REGION_MAX_BOOTING": "400",
    "LABVIRT_REGION_POOL_BUDGET_VMS": "100",
}


def wait_until(
    predicate: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.1
) -> Any:
    """Poll an external process's observable state until it holds (not a test of timing)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


@dataclass
class Proc:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


WORKER_READY = re.compile(r"@[^\s\"]+ ready\.")


def start(name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> Proc:
    log = log_dir / f"{name}.log"
    handle = log.open("wb")
    process = subprocess.Popen(
        argv, env=env, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    return Proc(name, process, log)


@dataclass
class Simulator:
    url: str
    kubeconfig: Path
    proc: Proc

    def api(self) -> client.ApiClient:
        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def vmis(self, selector: str = "app.kubernetes.io/managed-by=labvirt") -> list[dict[str, Any]]:
        with self.api() as api:
            result = client.CustomObjectsApi(api).list_namespaced_custom_object(
                "kubevirt.io",
                "v1",
                NAMESPACE,
                "virtualmachineinstances",
                label_selector=selector,
            )
        return list(result["items"])

    def services(self, selector: str = "app.kubernetes.io/managed-by=labvirt") -> list[Any]:
        with self.api() as api:
            return list(
                client.CoreV1Api(api)
                .list_namespaced_service(NAMESPACE, label_selector=selector)
                .items
            )

    def network_policies(self, selector: str = "app.kubernetes.io/managed-by=labvirt") -> list[Any]:
        with self.api() as api:
            return list(
                client.NetworkingV1Api(api)
                .list_namespaced_network_policy(NAMESPACE, label_selector=selector)
                .items
            )


def start_simulator(
    tmp: Path, *, boot_seconds: float = 1.0, extra: list[str] | None = None
) -> Simulator:
    kubeconfig = tmp / "sim.kubeconfig"
    argv = [
        sys.executable,
        "-m",
        "labvirt.cli",
        "sim",
        "--port",
        "0",
        "--kubeconfig",
        str(kubeconfig),
        "--boot-seconds",
        str(boot_seconds),
        "--seed",
        "7",
    ]
    schema = Path(__file__).resolve().parents[3] / "shared/kubevirt/vmi-schema-strict.json"
    if schema.exists():
        argv += ["--vmi-schema", str(schema)]
    proc = start("sim", argv + (extra or []), dict(os.environ), tmp)
    try:
        wait_until(kubeconfig.exists, timeout=20, what="the simulator's kubeconfig")
    except AssertionError:
        proc.stop()
        raise AssertionError(f"simulator did not start:\n{proc.tail()}") from None
    server = yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
    return Simulator(server, kubeconfig, proc)


def templates_file(tmp: Path) -> Path:
    """The shipped templates plus a short-lived one that lets beat's reaper act in seconds."""
    from importlib import resources  # noqa: PLC0415

    data = yaml.safe_load(resources.files("shared.templates").joinpath("default.yaml").read_text())
    short = dict(data["templates"]["ubuntu"])
    short["description"] = "An Ubuntu VM that lives a few seconds"
    short["max_lifetime_seconds"] = SHORT_LIFETIME_SECONDS
    data["templates"]["short"] = short
    path = tmp / "templates.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@dataclass
class System:
    base_url: str
    sim: Simulator
    redis_url: str
    procs: dict[str, Proc] = field(default_factory=dict)
    http: requests.Session = field(default_factory=requests.Session)
    env: dict[str, str] = field(default_factory=dict)  # what the processes were started with
    api_url: str = ""  # the API itself, behind the gateway
    # Where `worker`, `beat` and `prewarm` serve /metrics (processes started later from
    # ``env`` serve none: LABVIRT_METRICS_PORT=0 there).
    metrics_ports: dict[str, int] = field(default_factory=dict)

    def call(
        self, method: str, path: str, *, token: str | None = FRONTEND_TOKEN, **kwargs: Any
    ) -> requests.Response:
        headers = kwargs.pop("headers", {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return self.http.request(
            method, self.base_url + path, headers=headers, timeout=10, **kwargs
        )

    def create(self, template: str, user: str) -> dict[str, Any]:
        response = self.call("POST", "/v1/sessions", json={"template": template, "user": user})
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    def session(self, session_id: str) -> dict[str, Any]:
        response = self.call("GET", f"/v1/sessions/{session_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def wait_state(self, session_id: str, *states: str, timeout: float = 60) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            body = self.session(session_id)
            return body if body["state"] in states else None

        try:
            result: dict[str, Any] = wait_until(
                reached, timeout=timeout, what=f"session {session_id} to be {states}", interval=0.2
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None
        return result

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.tail()}" for p in self.procs.values())

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.stop()
        self.sim.proc.stop()


def start_system(
    redis_url: str,
    tmp: Path,
    *,
    extra_env: dict[str, str] | None = None,
    sim_args: list[str] | None = None,
    sim: Simulator | None = None,
) -> System:
    """Simulator, then `labvirt api`, `gateway`, `worker` and `beat`, each on its own.

    The gateway is the one origin the tests talk to (``base_url``), as a browser does behind
    an ingress: it serves event streams and terminals and hands the API's paths to the API
    (``api_url``, which tests may also call directly).

    ``sim``: a simulator the caller started (several regions: ``extra_env`` then names them
    all, e.g. with ``LABVIRT_CLUSTERS_FILE``); it becomes ``System.sim``.
    """
    if sim is None:
        sim = start_simulator(tmp, extra=sim_args)
    port = free_port()
    gateway_port = free_port()
    env = dict(os.environ)
    env.update(
        {
            "REDIS_URL": redis_url,
            "LABVIRT_MODE": "production",
            "LABVIRT_KUBECONFIG": str(sim.kubeconfig),
            "LABVIRT_NAMESPACE": NAMESPACE,
            "LABVIRT_API_HOST": "127.0.0.1",
            "LABVIRT_API_PORT": str(port),
            "LABVIRT_GATEWAY_HOST": "127.0.0.1",
            "LABVIRT_GATEWAY_PORT": str(gateway_port),
            "LABVIRT_GATEWAY_API_URL": f"http://127.0.0.1:{port}",
            "LABVIRT_FRONTEND_TOKENS": FRONTEND_TOKEN,
            "LABVIRT_ADMIN_TOKENS": ADMIN_TOKEN,
            "LABVIRT_METRICS_TOKENS": SCRAPE_TOKEN,
            "LABVIRT_METRICS_PORT": "0",
            "LABVIRT_TEMPLATES": str(templates_file(tmp)),
            "LABVIRT_REAPER_INTERVAL_SECONDS": "1",
            # The tests create and heartbeat many sessions quickly from one frontend token
            # and one address: limits high enough for that load, still checked on every call.
            **E2E_RATE_LIMITS,
            "LABVIRT_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        }
    )
    for name, value in E2E_REGION_LIMITS.items():
        env.setdefault(name, value)
    env.update(extra_env or {})
    metrics_ports = {name: free_port() for name in ("worker", "beat", "prewarm")}

    def env_of(name: str) -> dict[str, str]:
        port = metrics_ports.get(name)
        return env if port is None else {**env, "LABVIRT_METRICS_PORT": str(port)}

    procs = {
        name: start(name, [sys.executable, "-m", "labvirt.cli", name], env_of(name), tmp)
        for name in ("api", "gateway", "worker", "beat")
    }
    # Warm pools boot on a worker of their own, as in production (the `prewarm` queue).
    prewarm = [sys.executable, "-m", "labvirt.cli", "worker", "--queues", "prewarm"]
    procs["prewarm"] = start("prewarm", prewarm, env_of("prewarm"), tmp)
    system = System(
        f"http://127.0.0.1:{gateway_port}",
        sim,
        redis_url,
        procs,
        env=env,
        api_url=f"http://127.0.0.1:{port}",
        metrics_ports=metrics_ports,
    )

    def api_ready() -> bool:
        for proc in procs.values():
            if proc.process.poll() is not None:
                raise AssertionError(f"{proc.name} exited early:\n{proc.tail()}")
        try:
            return requests.get(system.base_url + "/readyz", timeout=1).status_code == 200
        except (requests.ConnectionError, requests.Timeout):  # still starting, on a busy machine
            return False

    def workers_ready() -> bool:
        # Celery logs "<name>@<host> ready." once it consumes: before that, a test's short
        # clocks (an idle timeout of seconds) would run against a worker still starting.
        return all(
            WORKER_READY.search(procs[name].log.read_text(errors="replace"))
            for name in ("worker", "prewarm")
        )

    try:
        wait_until(api_ready, timeout=60, what="the API to answer /readyz through the gateway")
        wait_until(workers_ready, timeout=60, what="the workers to consume their queues")
    except BaseException:
        system.stop()
        raise
    return system
