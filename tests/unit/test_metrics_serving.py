"""Who may scrape, and how each kind of process serves ``/metrics``: the token rule, its
configuration, the workers' and beat's small server, the gateway's route, and multiprocess
mode (several processes of one group, one scrape that sums them)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from shared.config import Cluster, ConfigError, Mode, Settings
from shared.metrics.access import scrape_refusal
from shared.metrics.multiprocess import enable_multiprocess
from shared.metrics.server import MetricsServer, start_metrics_server
from tests.unit.test_gateway_events import KUBECONFIG, Env, Http, bearer, events_url, next_block

FRONTEND = "frontend-3f786850e387550fdab836ed7e6dc881"
ADMIN = "admin-e9d71f5ee7c92d6dc9e92ffdad17b8bd"
SCRAPE = "scrape-4b1f0a9d2c8e7f3a5b6c1d0e9f8a7b6c"
SETTINGS = Settings(
    mode=Mode.DEV,
    frontend_tokens=frozenset({FRONTEND}),
    admin_tokens=frozenset({ADMIN}),
    metrics_tokens=frozenset({SCRAPE}),
    metrics_port=0,
    clusters=(Cluster("local", None, None, "default"),),
)
ROOT = Path(__file__).resolve().parents[2]


# -- the token rule --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        (None, 401),
        ("", 401),
        (f"Basic {ADMIN}", 401),
        ("Bearer ", 401),
        ("Bearer not-a-token-of-ours-0123456789", 401),
        (f"Bearer {FRONTEND}", 403),
        (f"Bearer {ADMIN}", None),
        (f"Bearer {SCRAPE}", None),
        (f"bearer {SCRAPE}", None),
    ],
)
def test_an_admin_or_scrape_token_scrapes_and_nothing_else(
    authorization: str | None, status: int | None
) -> None:
    refusal = scrape_refusal(authorization, SETTINGS)
    assert (refusal.status if refusal else None) == status


def environment(**extra: str) -> dict[str, str]:
    return {
        "LABVIRT_MODE": "dev",
        "LABVIRT_FRONTEND_TOKENS": FRONTEND,
        "LABVIRT_ADMIN_TOKENS": ADMIN,
        **extra,
    }


def test_scrape_tokens_and_the_port_come_from_the_environment() -> None:
    settings = Settings.from_env(
        environment(
            LABVIRT_METRICS_TOKENS=f"{SCRAPE}, {SCRAPE[::-1]}",
            LABVIRT_METRICS_PORT="9100",
            LABVIRT_METRICS_DIR="/run/labvirt-metrics",
        )
    )
    assert settings.metrics_tokens == {SCRAPE, SCRAPE[::-1]}
    assert settings.metrics_port == 9100
    assert settings.metrics_dir == Path("/run/labvirt-metrics")
    defaults = Settings.from_env(environment())
    assert (defaults.metrics_tokens, defaults.metrics_port, defaults.metrics_dir) == (
        frozenset(),
        9464,
        None,
    )


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"LABVIRT_METRICS_TOKENS": "scrape-password-1"}, "LABVIRT_METRICS_TOKENS"),
        ({"LABVIRT_METRICS_TOKENS": "a" * 40}, "LABVIRT_METRICS_TOKENS"),
        ({"LABVIRT_METRICS_TOKENS": FRONTEND}, "LABVIRT_METRICS_TOKENS"),
        ({"LABVIRT_METRICS_PORT": "70000"}, "LABVIRT_METRICS_PORT"),
        ({"LABVIRT_METRICS_PORT": "nine"}, "LABVIRT_METRICS_PORT"),
    ],
)
def test_a_bad_metrics_setting_stops_the_process_naming_it(
    extra: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        Settings.from_env(environment(**extra))


# -- the workers' and beat's server ----------------------------------------------------------


@pytest.fixture
def server() -> Any:
    serving = MetricsServer(SETTINGS, host="127.0.0.1").start()  # port 0: any free one
    yield serving
    serving.stop()


def get(server: MetricsServer, path: str = "/metrics", token: str | None = None) -> Any:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return requests.get(f"http://127.0.0.1:{server.port}{path}", headers=headers, timeout=5)


def test_the_server_answers_a_scraper_with_the_text_format(server: MetricsServer) -> None:
    for token in (SCRAPE, ADMIN):
        answer = get(server, token=token)
        assert answer.status_code == 200
        assert answer.headers["Content-Type"].startswith("text/plain")
        names = {f.name for f in text_string_to_metric_families(answer.text)}
        assert "process_cpu_seconds" in names  # this process's own series


@pytest.mark.parametrize(
    ("path", "token", "status", "code"),
    [
        ("/metrics", None, 401, "unauthorized"),
        ("/metrics", FRONTEND, 403, "forbidden"),
        ("/", SCRAPE, 404, "not_found"),
        ("/metrics/../admin", SCRAPE, 404, "not_found"),
    ],
)
def test_the_server_refuses_with_problems(
    server: MetricsServer, path: str, token: str | None, status: int, code: str
) -> None:
    answer = get(server, path, token)
    assert answer.status_code == status
    assert answer.headers["Content-Type"] == "application/problem+json"
    assert answer.json()["code"] == code
    if status == 401:
        assert answer.headers["WWW-Authenticate"] == "Bearer"


def test_other_methods_are_a_405_not_a_server_error(server: MetricsServer) -> None:
    answer = requests.post(f"http://127.0.0.1:{server.port}/metrics", timeout=5)
    assert (answer.status_code, answer.headers["Allow"]) == (405, "GET")
    assert answer.json()["code"] == "method_not_allowed"


def test_a_port_taken_stops_the_process_naming_the_variable() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = dataclasses.replace(SETTINGS, metrics_port=port)
        with pytest.raises(ConfigError, match=f"LABVIRT_METRICS_PORT={port}"):
            MetricsServer(settings, host="127.0.0.1")


def test_port_zero_serves_nothing() -> None:
    assert start_metrics_server(SETTINGS) is None


# -- multiprocess mode -----------------------------------------------------------------------

# Two children of one process group record; the parent's one scrape sums them.
FORKED = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from shared.metrics.multiprocess import enable_multiprocess, mark_process_dead

    directory = enable_multiprocess(Path(sys.argv[1]), process="test")
    from shared.metrics.exposition import render
    from shared.metrics.series import series

    children = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            series().orphans_deleted.labels(region="forked").inc()
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
        mark_process_dead(pid)
    print(json.dumps({"directory": str(directory), "text": render()[0].decode()}))
    """
)


def test_processes_of_one_group_are_summed_and_their_directory_removed(tmp_path: Path) -> None:
    parent = tmp_path / "metrics"
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    done = subprocess.run(
        [sys.executable, "-c", FORKED, str(parent)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(answer["text"])
        for s in family.samples
    }
    assert samples[("labvirt_orphans_deleted_total", (("region", "forked"),))] == 2
    assert Path(answer["directory"]).parent == parent
    assert not Path(answer["directory"]).exists()  # the group's maker removed it at exit


def test_multiprocess_mode_cannot_be_chosen_after_prometheus_is_imported(tmp_path: Path) -> None:
    assert "prometheus_client" in sys.modules  # this test process records already
    with pytest.raises(RuntimeError, match="before prometheus_client is imported"):
        enable_multiprocess(tmp_path, process="test")


def test_a_metrics_dir_that_cannot_be_made_names_the_variable(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    script = (
        "import sys; from pathlib import Path; "
        "from shared.metrics.multiprocess import enable_multiprocess; "
        "from shared.config import ConfigError\n"
        "try:\n    enable_multiprocess(Path(sys.argv[1]), process='test')\n"
        "except ConfigError as exc:\n    print(exc)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(blocked / "below")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=True,
    )
    assert done.stdout.startswith("LABVIRT_METRICS_DIR="), done.stdout + done.stderr


# -- the gateway -----------------------------------------------------------------------------


@pytest.fixture
def gateway(redis_url: str, tmp_path: Path) -> Any:
    from tests.conftest import flush_database  # noqa: PLC0415

    flush_database(redis_url)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(KUBECONFIG)
    made = Env(redis_url, kubeconfig)
    yield made
    made.redis.close()
    flush_database(redis_url)


def test_the_gateway_serves_its_open_streams_to_a_scraper(gateway: Env) -> None:
    session_id, token = gateway.open_session()

    async def scenario(http: Http) -> tuple[int, int, dict[str, float]]:
        refused = await http.get("/metrics", headers=bearer(FRONTEND))
        unauthenticated = await http.get("/metrics")
        stream = await http.get(events_url(session_id), headers=bearer(token))
        await next_block(stream)  # the stream is open
        during = await (await http.get("/metrics", headers=bearer(SCRAPE))).text()
        stream.close()
        return refused.status, unauthenticated.status, gauges(during)

    refused, unauthenticated, during = gateway.serve(scenario, metrics_tokens=frozenset({SCRAPE}))

    assert (refused, unauthenticated) == (403, 401)
    assert during["labvirt_gateway_open_streams"] == 1
    assert during["labvirt_gateway_open_terminals"] == 0


def gauges(text: str) -> dict[str, float]:
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("labvirt_gateway_")
    }
