"""Every `labvirt ...` line of the README, run as written through the installed console script.

A reader copies these lines into a shell: each must start, keep running, show that it does its
job, and stop on SIGTERM as it would under Kubernetes. The lines are read from the README, so a
command documented there cannot drift from what the `labvirt` script accepts.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from shared.adapters.redis_server import free_port
from tests.e2e.harness import Proc, Simulator, start, start_simulator, wait_until

pytestmark = pytest.mark.e2e

README = Path(__file__).resolve().parents[2] / "README.md"
LABVIRT = Path(sys.executable).with_name("labvirt")  # the console script users run
CODE_INDENT = "    "
# Box-drawing characters and arrows: such a block is a diagram, whatever words it holds.
DIAGRAM = re.compile("[\u2500-\u25ff]")
RUNNING_SECONDS = 2.0  # how long after its start a command must still be up
STARTUP_TIMEOUT = 30.0

# What shows that a started command works, from its argv, environment and process.
Readiness = Callable[[Proc], object]


def readme_commands(text: str) -> list[list[str]]:
    """The argv of each line of a shell code block that runs `labvirt`, its comment cut."""
    commands = []
    for block in _code_blocks(text):
        if any(DIAGRAM.search(line) for line in block):
            continue
        for line in block:
            if line.startswith("labvirt "):
                commands.append(shlex.split(line, comments=True))
    return commands


def _code_blocks(text: str) -> list[list[str]]:
    """Markdown's indented code blocks, without their indentation: runs of lines indented four
    spaces that start after a blank line (an indented line cannot interrupt a paragraph)."""
    blocks: list[list[str]] = []
    block: list[str] | None = None
    previous_blank = True
    for line in text.splitlines():
        indented = line.startswith(CODE_INDENT)
        if block is not None and not indented and line.strip():
            blocks.append(block)
            block = None
        if indented and block is None and previous_blank:
            block = []
        if indented and block is not None:
            block.append(line[len(CODE_INDENT) :])
        previous_blank = not line.strip()
    if block is not None:
        blocks.append(block)
    return blocks


ALL_COMMANDS = readme_commands(README.read_text(encoding="utf-8"))
# Services run until stopped; `labvirt ops` lines are an operator's one-shot commands.
COMMANDS = [argv for argv in ALL_COMMANDS if argv[1] != "ops"]
OPS_COMMANDS = [argv for argv in ALL_COMMANDS if argv[1] == "ops"]
# The failed task the README's examples name: its id is derived from the task and payload.
README_FAILURE = ("labvirt.provision", {"session_id": "s-5f1c0e3b9a7d2c4e6f8a0b1c"})
ADMIN_TOKEN = "readme-admin-c9f0f895fb98ab9159f51fd0297e236d"


def _option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def _log_records(proc: Proc) -> list[dict[str, Any]]:
    """The JSON log lines of a process (Celery's banner and warnings are plain text)."""
    records = []
    for line in proc.log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line still being written
    return records


def _get(url: str) -> requests.Response | None:
    try:
        return requests.get(url, timeout=1)
    except requests.ConnectionError:
        return None


def _api(argv: list[str], env: dict[str, str], request: pytest.FixtureRequest) -> Readiness:
    url = f"http://{env['LABVIRT_API_HOST']}:{env['LABVIRT_API_PORT']}/healthz"

    def healthy(_: Proc) -> bool:
        response = _get(url)
        return response is not None and response.status_code == 200

    return healthy


def _gateway(argv: list[str], env: dict[str, str], request: pytest.FixtureRequest) -> Readiness:
    url = f"http://{env['LABVIRT_GATEWAY_HOST']}:{env['LABVIRT_GATEWAY_PORT']}/healthz"

    def healthy(_: Proc) -> bool:
        response = _get(url)
        return response is not None and response.status_code == 200

    return healthy


def _worker(argv: list[str], env: dict[str, str], request: pytest.FixtureRequest) -> Readiness:
    queues = _option(argv, "--queues")

    def ready(proc: Proc) -> bool:
        # Celery names the worker labvirt-<pid>@<host> and logs "<name> ready." once consuming.
        name = f"labvirt-{proc.process.pid}@{socket.gethostname()}"
        records = _log_records(proc)
        consuming = any(r.get("event") == f"{name} ready." for r in records)
        wired = [r.get("queues") for r in records if r.get("event") == "worker.wired"]
        return consuming and (queues is None or wired == [queues.split(",")])

    return ready


def _beat(argv: list[str], env: dict[str, str], request: pytest.FixtureRequest) -> Readiness:
    return lambda proc: any(r.get("event") == "beat: Starting..." for r in _log_records(proc))


def _sim(argv: list[str], env: dict[str, str], request: pytest.FixtureRequest) -> Readiness:
    """The README's fixed port may be taken here; its kubeconfig path is shared, so a file left
    from an earlier run must be rewritten, and one this test created is removed after it."""
    port = int(_option(argv, "--port") or 0)
    kubeconfig = Path(_option(argv, "--kubeconfig") or "")
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            pytest.skip(f"port {port} of `{shlex.join(argv)}` is already taken on this machine")
    before = kubeconfig.stat().st_mtime_ns if kubeconfig.exists() else None
    if before is None:
        request.addfinalizer(lambda: kubeconfig.unlink(missing_ok=True))

    def serving(_: Proc) -> bool:
        if not kubeconfig.exists() or kubeconfig.stat().st_mtime_ns == before:
            return False
        server = yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
        response = _get(f"{server}/version")
        return response is not None and "gitVersion" in response.json()

    return serving


READINESS: dict[str, Callable[[list[str], dict[str, str], pytest.FixtureRequest], Readiness]] = {
    "api": _api,
    "gateway": _gateway,
    "worker": _worker,
    "beat": _beat,
    "sim": _sim,
}


@pytest.fixture(scope="module")
def simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    sim = start_simulator(tmp_path_factory.mktemp("readme-sim"))
    try:
        yield sim
    finally:
        sim.proc.stop()


@pytest.fixture
def environment(own_redis_url: str, simulator: Simulator) -> dict[str, str]:
    """What a newcomer exports before running the commands; nothing inherited from LABVIRT_*."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("LABVIRT_")}
    env.update(
        {
            "LABVIRT_MODE": "dev",
            "REDIS_URL": own_redis_url,
            "LABVIRT_KUBECONFIG": str(simulator.kubeconfig),
            "LABVIRT_API_HOST": "127.0.0.1",
            "LABVIRT_API_PORT": str(free_port()),
            "LABVIRT_GATEWAY_HOST": "127.0.0.1",
            "LABVIRT_GATEWAY_PORT": str(free_port()),
            "LABVIRT_ADMIN_TOKENS": ADMIN_TOKEN,
            # Workers and beat serve /metrics: on a port of their own, not the shared default.
            "LABVIRT_METRICS_PORT": str(free_port()),
            "LABVIRT_LOG_FORMAT": "json",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def test_the_readme_shows_every_service() -> None:
    """Guards the parsing: a README change that hid its commands would otherwise test nothing."""
    assert {argv[1] for argv in COMMANDS} >= set(READINESS), COMMANDS


@pytest.mark.parametrize("argv", COMMANDS, ids=shlex.join)
def test_readme_command_starts_works_and_stops(
    argv: list[str],
    environment: dict[str, str],
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    assert LABVIRT.exists(), f"no `labvirt` console script beside {sys.executable}"
    ready = READINESS[argv[1]](argv, environment, request)
    started = time.monotonic()
    proc = start(argv[1], [str(LABVIRT), *argv[1:]], environment, tmp_path)
    try:

        def working() -> object:
            if proc.process.poll() is not None:
                raise AssertionError(f"`{shlex.join(argv)}` exited:\n{proc.tail()}")
            return ready(proc)

        wait_until(working, timeout=STARTUP_TIMEOUT, what=f"`{shlex.join(argv)}` to work")
        time.sleep(max(0.0, started + RUNNING_SECONDS - time.monotonic()))
        assert proc.process.poll() is None, f"`{shlex.join(argv)}` exited:\n{proc.tail()}"
        proc.process.send_signal(signal.SIGTERM)
        assert proc.process.wait(timeout=20) == 0, proc.tail()
    finally:
        proc.stop()


def test_the_readme_shows_an_operators_commands() -> None:
    assert {argv[2] for argv in OPS_COMMANDS} >= {"failed", "sessions", "pools", "drain"}


def test_readme_ops_commands_work_as_written(
    environment: dict[str, str], own_redis_url: str, tmp_path: Path
) -> None:
    """Every `labvirt ops` line, in the README's order, against a running `labvirt api`."""
    import redis  # noqa: PLC0415

    from shared.adapters.dead_letters import DeadLetters  # noqa: PLC0415

    client = redis.Redis.from_url(own_redis_url)
    task, payload = README_FAILURE
    DeadLetters(client).record(
        task=task,
        payload=payload,
        task_id=None,
        error=RuntimeError("VM lv-readme-ubuntu reached phase Failed"),
        traceback="",
    )
    client.close()
    api = start("api", [str(LABVIRT), "api"], environment, tmp_path)
    try:
        wait_until(
            lambda: _api(["labvirt", "api"], environment, None)(api),  # type: ignore[arg-type]
            timeout=STARTUP_TIMEOUT,
            what="the API",
        )
        for argv in OPS_COMMANDS:
            result = subprocess.run(
                [str(LABVIRT), *argv[1:]],
                env=environment,
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert result.returncode == 0, (shlex.join(argv), result.stderr, api.tail())
            assert result.stdout.strip(), shlex.join(argv)
    finally:
        api.stop()


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        (["--help"], "usage: labvirt [-h] COMMAND"),
        (["sim", "--help"], "usage: labvirt sim [-h] --port PORT --kubeconfig KUBECONFIG"),
    ],
)
def test_help_exits_zero(argv: list[str], usage: str) -> None:
    result = subprocess.run(
        [str(LABVIRT), *argv], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(usage), result.stdout
