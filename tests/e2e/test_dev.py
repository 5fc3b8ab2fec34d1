"""`labvirt dev` (what `make run` starts): up, the printed curl works, Ctrl-C leaves nothing."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
import requests

from shared.adapters.redis_server import free_port
from tests.e2e.harness import wait_until

pytestmark = pytest.mark.e2e


def test_dev_runs_the_printed_curl_to_a_ready_session_and_stops_cleanly(
    own_redis_url: str, tmp_path: Path
) -> None:
    env = dict(os.environ)
    env.update({"REDIS_URL": own_redis_url, "LABVIRT_API_PORT": str(free_port())})
    for name in ("LABVIRT_KUBECONFIG", "LABVIRT_CLUSTERS", "LABVIRT_FRONTEND_TOKENS"):
        env.pop(name, None)
    dev = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "labvirt.cli",
            "dev",
            "--run-dir",
            str(tmp_path / "run"),
            "--sim-boot-seconds",
            "1",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(dev.stdout or []), daemon=True).start()
    try:
        wait_until(
            lambda: any("Ctrl-C stops everything" in line for line in lines),
            timeout=90,
            what="labvirt dev's banner",
        )
        children = psutil.Process(dev.pid).children(recursive=True)
        assert len(children) >= 4  # simulator, api, worker, beat

        curl = next(line.split("| ", 1)[1].strip() for line in lines if "curl -s -X POST" in line)
        created = subprocess.run(shlex.split(curl), capture_output=True, text=True, check=True)
        session = json.loads(created.stdout)
        assert session["state"] == "provisioning", created.stdout

        token = re.search(r"Bearer ([\w-]+)", curl).group(1)  # type: ignore[union-attr]
        base = re.search(r"(http://\S+)/v1/sessions", curl).group(1)  # type: ignore[union-attr]

        def ready() -> bool:
            body = requests.get(
                f"{base}/v1/sessions/{session['id']}",
                headers={"Authorization": f"Bearer {token}"},
                timeout=5,
            ).json()
            assert body["state"] in ("provisioning", "ready"), body
            return body["state"] == "ready"

        wait_until(ready, timeout=60, what="the session to be ready", interval=0.2)
    finally:
        dev.send_signal(signal.SIGINT)
        assert dev.wait(timeout=60) == 0, "".join(lines[-40:])
    _gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left running: {alive}"
