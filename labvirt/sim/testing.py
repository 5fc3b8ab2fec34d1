"""Run the simulator for tests: as a subprocess (what e2e tests use) or on a thread.

    with running_simulator(tmp_path, boot_seconds=0.5, seed=1) as sim:
        sim.url, sim.kubeconfig_path
        sim.set_faults(error_rate=0.2)
        client = sim.api_client()        # a configured kubernetes.client.ApiClient

Keyword arguments become ``labvirt sim`` flags (``boot_seconds=0.5`` -> ``--boot-seconds
0.5``; ``emulation=True`` -> ``--emulation``; ``None``/``False`` leave a flag out).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labvirt.sim.kubeconfig import server_url
from labvirt.sim.store import Store


def config_flags(config: dict[str, Any]) -> list[str]:
    flags: list[str] = []
    for key, value in config.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            flags.append(flag)
        else:
            flags.extend([flag, str(value)])
    return flags


@dataclass(frozen=True)
class SimHandle:
    url: str
    kubeconfig_path: Path
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    simulator: Any = None  # the in-thread ``app.Simulator``, for white-box checks

    def request(self, method: str, path: str, body: Any = None, timeout: float = 10.0) -> Any:
        """A JSON request; returns the decoded body, raising ``urllib.error.HTTPError``."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 - our own http:// URL
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        # The simulator this helper started, over http.
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310  # nosec B310
            return json.loads(response.read() or b"null")

    def faults(self) -> dict[str, float]:
        result: dict[str, float] = self.request("GET", "/_sim/faults")
        return result

    def set_faults(self, **faults: float) -> dict[str, float]:
        result: dict[str, float] = self.request("PUT", "/_sim/faults", faults)
        return result

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/_sim/stats")
        return result

    def crash(self, namespace: str, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", f"/_sim/vmis/{namespace}/{name}/crash")
        return result

    def api_client(self, **configuration: Any) -> Any:
        """A ``kubernetes.client.ApiClient`` loaded from the kubeconfig; keyword arguments
        set attributes of its ``Configuration`` (e.g. ``connection_pool_maxsize=32``)."""
        from kubernetes import client, config  # noqa: PLC0415 - only tests need it

        conf = client.Configuration()
        config.load_kube_config(config_file=str(self.kubeconfig_path), client_configuration=conf)
        for key, value in configuration.items():
            setattr(conf, key, value)
        return client.ApiClient(conf)

    def kubectl_env(self, cache_dir: Path | None = None) -> dict[str, str]:
        """Environment for running kubectl against this simulator."""
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig_path))
        if cache_dir is not None:
            env["KUBECACHEDIR"] = str(cache_dir)
        return env


def _wait_for_file(path: Path, deadline: float, process: subprocess.Popen[bytes] | None) -> None:
    while not path.exists():
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the simulator exited with {process.returncode} before listening")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the simulator did not write {path} in time")
        time.sleep(0.02)


@contextmanager
def running_simulator(
    tmp_path: Path, *, startup_timeout: float = 30.0, **config: Any
) -> Iterator[SimHandle]:
    """``labvirt sim`` (``python -m labvirt.cli sim``) in a subprocess; SIGTERM on exit."""
    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    kubeconfig = tmp_path / "sim-kubeconfig.yaml"
    kubeconfig.unlink(missing_ok=True)
    log_path = tmp_path / "sim.log"
    config.setdefault("port", 0)
    argv = [
        sys.executable,
        "-m",
        "labvirt.cli",
        "sim",
        "--kubeconfig",
        str(kubeconfig),
        *config_flags(config),
    ]
    with log_path.open("wb") as log:
        # The simulator's own command line, run without a shell.
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603  # nosec B603
    try:
        try:
            _wait_for_file(kubeconfig, time.monotonic() + startup_timeout, process)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}\n{log_path.read_text(errors='replace')}") from exc
        yield SimHandle(server_url(kubeconfig), kubeconfig, process, log_path)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextmanager
def running_simulator_in_thread(
    tmp_path: Path,
    *,
    with_kubevirt: bool = True,
    setup: Callable[[Store], None] | None = None,
    startup_timeout: float = 30.0,
    **config: Any,
) -> Iterator[SimHandle]:
    """The same server on a background thread's event loop, with a ``setup`` hook that may
    register extra types. Real HTTP; the handle carries the ``Simulator`` for inspection."""
    from labvirt.sim.app import parse_settings, serve  # noqa: PLC0415 - avoid an import cycle

    tmp_path = Path(tmp_path)
    kubeconfig = tmp_path / "sim-kubeconfig.yaml"
    kubeconfig.unlink(missing_ok=True)
    config.setdefault("port", 0)
    settings, _ = parse_settings(["--kubeconfig", str(kubeconfig), *config_flags(config)])
    ready = threading.Event()
    state: dict[str, Any] = {}

    def on_ready(url: str, simulator: Any) -> None:
        state["url"], state["simulator"] = url, simulator
        ready.set()

    def run() -> None:
        loop = asyncio.new_event_loop()
        state["loop"] = loop
        stop = asyncio.Event()
        state["stop"] = stop
        try:
            loop.run_until_complete(
                serve(
                    settings,
                    stop=stop,
                    handle_signals=False,
                    with_kubevirt=with_kubevirt,
                    setup=setup,
                    on_ready=on_ready,
                )
            )
        except BaseException as exc:  # noqa: BLE001 - reported to the waiting test
            state["error"] = exc
            ready.set()
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="labvirt-sim", daemon=True)
    thread.start()
    if not ready.wait(startup_timeout) or "error" in state:
        raise RuntimeError(f"the simulator did not start: {state.get('error')}")
    try:
        yield SimHandle(state["url"], kubeconfig, simulator=state["simulator"])
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(timeout=15)


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy; raise ``TimeoutError`` if never."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval)


__all__ = [
    "SimHandle",
    "config_flags",
    "running_simulator",
    "running_simulator_in_thread",
    "wait_until",
]
