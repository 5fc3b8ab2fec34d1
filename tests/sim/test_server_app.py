"""``labvirt sim`` as a process: kubeconfig once listening, clean shutdown, CLI errors."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
from urllib.parse import urlparse

import pytest
import yaml

from labvirt.cli import main
from labvirt.sim.kubeconfig import server_url, write_kubeconfig
from labvirt.sim.testing import config_flags, running_simulator


def test_config_flags():
    assert config_flags(
        {"boot_seconds": 0.5, "emulation": True, "seed": None, "error_rate": 0.2, "quiet": False}
    ) == ["--boot-seconds", "0.5", "--emulation", "--error-rate", "0.2"]


def test_write_kubeconfig_is_atomic_and_complete(tmp_path):
    path = tmp_path / "nested" / "config"
    write_kubeconfig(path, "http://127.0.0.1:1234")
    doc = yaml.safe_load(path.read_text())
    assert doc["current-context"] == "labvirt-sim"
    assert doc["users"][0]["user"]["token"]
    assert server_url(path) == "http://127.0.0.1:1234"
    assert [p.name for p in path.parent.iterdir()] == ["config"]


def test_sigterm_closes_watch_streams_and_exits_zero(tmp_path):
    with running_simulator(tmp_path, seed=1) as sim:
        assert "simulator listening on http://127.0.0.1:" in sim.log_path.read_text()
        parsed = urlparse(sim.url)
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=10)
        conn.request("GET", "/api/v1/namespaces?watch=1")
        response = conn.getresponse()
        first = json.loads(response.readline())
        assert first["type"] == "ADDED"
        assert sim.stats()["watchStreams"] == 1
        sim.process.send_signal(signal.SIGTERM)
        rest = response.read()  # the stream ends with its final chunk, not a reset
        assert [json.loads(line)["type"] for line in rest.splitlines()] == ["ADDED"]
        assert sim.process.wait(timeout=10) == 0
        conn.close()


def test_port_in_use_fails_with_a_message(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "labvirt.cli",
                "sim",
                "--port",
                str(port),
                "--kubeconfig",
                str(tmp_path / "k"),
            ],
            capture_output=True,
            check=False,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert "simulator failed" in result.stderr
    assert not (tmp_path / "k").exists()


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--port", "0"],
        ["--port", "0", "--kubeconfig", "k", "--error-rate", "2"],
        ["--port", "0", "--kubeconfig", "k", "--boot-seconds", "0"],
    ],
)
def test_bad_arguments_exit_2(argv):
    with pytest.raises(SystemExit) as caught:
        main(["sim", *argv])
    assert caught.value.code == 2


def test_help_shows_the_simulators_options(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["sim", "--help"])
    assert caught.value.code == 0
    assert capsys.readouterr().out.startswith("usage: labvirt sim [-h] --port PORT --kubeconfig")
