"""``labvirt dev``: the whole system on one machine, for a newcomer.

Redis from ``REDIS_URL`` or an embedded one; the cluster from ``LABVIRT_KUBECONFIG`` or a
simulator; then the API, a worker and beat as child processes with their logs interleaved.
Ctrl-C stops everything and leaves nothing running.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import FrameType

from shared.adapters.redis_server import EmbeddedRedis, answers, free_port

_PR_SET_PDEATHSIG = 1
_COLOURS = {
    "dev": 37,
    "sim": 35,
    "api": 32,
    "gateway": 92,
    "worker": 36,
    "prewarm": 34,
    "beat": 33,
}


def _die_with_parent() -> None:
    """Children get SIGTERM if ``labvirt dev`` itself is killed (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Supervisor:
    def __init__(self) -> None:
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._print_lock = threading.Lock()
        self._width = max(len(n) for n in _COLOURS)
        self._tty = sys.stdout.isatty()

    def say(self, name: str, line: str) -> None:
        label = name.ljust(self._width)
        if self._tty:
            label = f"\033[{_COLOURS.get(name, 37)}m{label}\033[0m"
        with self._print_lock:
            print(f"{label} | {line}", flush=True)

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(  # noqa: S603 - our own interpreter and module  # nosec B603
            argv,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,  # noqa: PLW1509
        )
        self.children.append((name, process))
        threading.Thread(target=self._pump, args=(name, process), daemon=True).start()
        return process

    def _pump(self, name: str, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            self.say(name, raw.decode(errors="replace").rstrip())

    def exited(self) -> tuple[str, int] | None:
        for name, process in self.children:
            code = process.poll()
            if code is not None:
                return name, code
        return None

    def stop(self, timeout: float = 10.0) -> None:
        for _, process in reversed(self.children):
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + timeout
        for name, process in reversed(self.children):
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say(name, "did not stop in time; killing it")
                process.kill()
                process.wait()


def _wait_for(predicate: object, *, timeout: float, what: str, sup: Supervisor) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        failed = sup.exited()
        if failed:
            raise RuntimeError(f"{failed[0]} exited with code {failed[1]} while waiting for {what}")
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


def _port_free(host: str, port: int) -> bool:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - our own URL  # nosec B310
            return bool(response.status == 200)
    except OSError:
        return False


def _redis(env: dict[str, str], run_dir: Path, sup: Supervisor) -> EmbeddedRedis | None:
    redis_url = env.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    if answers(redis_url):
        sup.say("dev", f"using Redis at {redis_url}")
        env["REDIS_URL"] = redis_url
        return None
    embedded = EmbeddedRedis(workdir=run_dir / "redis").start()
    env["REDIS_URL"] = embedded.url
    sup.say("dev", f"no Redis answered; started an embedded one at {embedded.url}")
    return embedded


_CLUSTER_VARIABLES = ("LABVIRT_KUBECONFIG", "LABVIRT_CLUSTERS", "LABVIRT_CLUSTERS_FILE")


def _cluster(env: dict[str, str], run_dir: Path, sup: Supervisor, boot_seconds: float) -> None:
    if any(env.get(name) for name in _CLUSTER_VARIABLES):
        sup.say("dev", f"using the cluster(s) from {' / '.join(_CLUSTER_VARIABLES)}")
        return
    kubeconfig = run_dir / "sim.kubeconfig"
    kubeconfig.unlink(missing_ok=True)
    sup.start(
        "sim",
        [
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
        ],
        env,
    )
    _wait_for(kubeconfig.exists, timeout=30, what="the simulator", sup=sup)
    env["LABVIRT_KUBECONFIG"] = str(kubeconfig)
    sup.say("dev", f"simulated KubeVirt cluster: kubectl --kubeconfig {kubeconfig} get vmi")


def _addresses(env: dict[str, str], sup: Supervisor) -> str:
    """One origin on ``LABVIRT_API_PORT``: the gateway listens there and hands the API's
    paths to the API on a private port, as an ingress routes by path in production."""
    host = env.setdefault("LABVIRT_API_HOST", "127.0.0.1")
    port = int(env.get("LABVIRT_API_PORT") or 8080)
    if not _port_free(host, port):
        new_port = free_port(host)
        sup.say("dev", f"port {port} is taken; labvirt uses {new_port} instead")
        port = new_port
    api_port = free_port(host)
    env["LABVIRT_API_PORT"] = str(api_port)
    env["LABVIRT_GATEWAY_HOST"] = host
    env["LABVIRT_GATEWAY_PORT"] = str(port)
    env["LABVIRT_GATEWAY_API_URL"] = f"http://{host}:{api_port}"
    return f"http://{host}:{port}"


def _metrics_env(env: dict[str, str], name: str, sup: Supervisor) -> dict[str, str]:
    """``env`` with a free LABVIRT_METRICS_PORT for ``name`` (unless metrics are off: 0)."""
    if env.get("LABVIRT_METRICS_PORT", "").strip() == "0":
        return env
    port = free_port(env.get("LABVIRT_API_HOST", "127.0.0.1"))
    sup.say("dev", f"{name} serves /metrics on port {port}")
    return {**env, "LABVIRT_METRICS_PORT": str(port)}


def _banner(base: str, frontend: str, admin: str) -> list[str]:
    body = '{"template": "ubuntu", "user": "alice"}'
    return [
        "",
        f"labvirt is up: {base}",
        f"learner page:  {base}/ui/",
        f"ops dashboard: {base}/ui/ops  (sign in with the admin token)",
        f"frontend token: {frontend}",
        f"admin token:    {admin}",
        "",
        "create an Ubuntu environment:",
        f"  curl -s -X POST {base}/v1/sessions -H 'Authorization: Bearer {frontend}' "
        f"-H 'Content-Type: application/json' -d '{body}'",
        "then follow it (use the id from the answer):",
        f"  curl -s {base}/v1/sessions/ID -H 'Authorization: Bearer {frontend}'",
        "",
        "Ctrl-C stops everything.",
        "",
    ]


def main(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["LABVIRT_MODE"] = "dev"
    env.setdefault("LABVIRT_LOG_FORMAT", "console")
    env.setdefault("PYTHONUNBUFFERED", "1")
    sup = Supervisor()
    embedded: EmbeddedRedis | None = None
    stopping = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        embedded = _redis(env, run_dir, sup)
        _cluster(env, run_dir, sup, args.sim_boot_seconds)
        # 128 random bits each: every process refuses a weaker token, in dev mode too.
        env.setdefault("LABVIRT_FRONTEND_TOKENS", f"dev-frontend-{secrets.token_hex(16)}")
        env.setdefault("LABVIRT_ADMIN_TOKENS", f"dev-admin-{secrets.token_hex(16)}")
        base = _addresses(env, sup)
        # One machine, one port each: workers and beat serve /metrics on their own.
        metrics = {name: _metrics_env(env, name, sup) for name in ("worker", "beat", "prewarm")}
        for name in ("api", "gateway", "worker", "beat"):
            sup.start(name, [sys.executable, "-m", "labvirt.cli", name], metrics.get(name, env))
        # Warm pools boot on a worker of their own, never on the threads learners wait for.
        sup.start(
            "prewarm",
            [sys.executable, "-m", "labvirt.cli", "worker", "--queues", "prewarm"],
            metrics["prewarm"],
        )
        # /readyz goes through the gateway to the API: both answer, and Redis too.
        _wait_for(lambda: _healthy(f"{base}/readyz"), timeout=60, what="the API", sup=sup)
        for line in _banner(
            base,
            env["LABVIRT_FRONTEND_TOKENS"].split(",")[0],
            env["LABVIRT_ADMIN_TOKENS"].split(",")[0],
        ):
            sup.say("dev", line)
        while not stopping.is_set():
            failed = sup.exited()
            if failed:
                sup.say("dev", f"{failed[0]} exited with code {failed[1]}; stopping everything")
                return 1
            stopping.wait(0.5)
        sup.say("dev", "stopping")
        return 0
    except RuntimeError as exc:
        sup.say("dev", f"error: {exc}")
        return 1
    finally:
        sup.stop()
        if embedded is not None:
            embedded.stop()
