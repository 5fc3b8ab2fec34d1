"""Metrics end to end: after a warm and a cold session, every process's ``/metrics`` shows it.

Real processes: the API (gunicorn, multiprocess mode), the gateway, a worker and a prewarm
worker (multiprocess mode, each on its own metrics port), beat. A system of its own, so its
counters hold only what this test did.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import claim_redis_database
from tests.e2e.harness import (
    ADMIN_TOKEN,
    FRONTEND_TOKEN,
    SCRAPE_TOKEN,
    System,
    start_system,
    wait_until,
)

pytestmark = pytest.mark.e2e

Samples = list[tuple[str, dict[str, str], float]]


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with claim_redis_database() as url:
        running = start_system(
            url,
            tmp_path_factory.mktemp("metrics"),
            # Two gunicorn workers: a scrape of either must show both's counts.
            extra_env={"LABVIRT_PREWARM_INTERVAL_SECONDS": "1", "LABVIRT_API_WORKERS": "2"},
        )
        try:
            yield running
        finally:
            running.stop()


def scrape(url: str, token: str | None = SCRAPE_TOKEN) -> requests.Response:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return requests.get(url, headers=headers, timeout=10)


def samples_of(url: str) -> Samples:
    answer = scrape(url)
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"].startswith("text/plain")
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples
    ]


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(
        value
        for found, their, value in samples
        if found == name and all(their.get(k) == v for k, v in labels.items())
    )


def names(samples: Samples) -> set[str]:
    return {name for name, _, _ in samples}


def worker_url(system: System, name: str) -> str:
    return f"http://127.0.0.1:{system.metrics_ports[name]}/metrics"


def test_every_process_shows_a_warm_and_a_cold_session(system: System) -> None:
    api = f"{system.api_url}/metrics"
    resized = system.call("PUT", "/v1/admin/pools/ubuntu", token=ADMIN_TOKEN, json={"size": 1})
    assert resized.status_code == 200, resized.text
    wait_until(
        lambda: total(samples_of(api), "labvirt_pool_ready", template="ubuntu") == 1,
        timeout=90,
        what="the ubuntu pool's environment to be ready, as /metrics says",
        interval=0.5,
    )

    warm = system.create("ubuntu", "metrics-warm")
    cold = system.create("short", "metrics-cold")
    assert (warm["warm"], cold["warm"]) == (True, False)
    system.wait_state(cold["id"], "ready")

    seen = samples_of(api)
    requests_total = "labvirt_session_requests_total"
    # Whichever API worker answers a scrape, it merges every worker's counts.
    for _ in range(6):
        again = samples_of(api)
        assert total(again, requests_total) == total(seen, requests_total) == 2
    assert total(seen, requests_total, template="ubuntu", outcome="warm") == 1
    assert total(seen, requests_total, template="short", outcome="cold") == 1
    assert total(seen, requests_total, outcome="rejected") == 0
    ready_count = "labvirt_session_time_to_ready_seconds_count"
    assert total(seen, ready_count, path="warm", template="ubuntu") == 1
    assert total(seen, "labvirt_pool_target", template="ubuntu", region="local") == 1
    assert {"labvirt_pool_ready", "labvirt_pool_in_flight"} <= names(seen)
    assert total(seen, "labvirt_region_up", region="local") == 1
    assert total(seen, "labvirt_redis_up") == 1
    assert "labvirt_dead_letters_failed" in names(seen)

    worker = samples_of(worker_url(system, "worker"))
    assert total(worker, ready_count, path="cold", template="short") == 1
    assert total(worker, "labvirt_session_time_to_ready_seconds_sum", path="cold") > 0
    assert total(worker, "labvirt_kube_calls_total", code="2xx", verb="create") > 0
    assert total(worker, "labvirt_provisioning_duration_seconds_count", template="short") == 1
    prewarm = samples_of(worker_url(system, "prewarm"))
    assert total(prewarm, "labvirt_kube_calls_total", verb="create", code="2xx") > 0

    # The short session's lifetime runs out: the reaper closes it, the worker ends it.
    wait_until(
        lambda: (
            total(
                samples_of(worker_url(system, "worker")),
                "labvirt_sessions_ended_total",
                template="short",
                state="ended",
                reason="lifetime",
            )
            == 1
        ),
        timeout=60,
        what="the short session's end, as the worker's /metrics says",
        interval=0.5,
    )


def test_beat_and_the_gateway_serve_theirs(system: System) -> None:
    assert "process_cpu_seconds_total" in names(samples_of(worker_url(system, "beat")))
    gateway = samples_of(f"{system.base_url}/metrics")
    assert {"labvirt_gateway_open_streams", "labvirt_gateway_open_terminals"} <= names(gateway)


@pytest.mark.parametrize("token", [None, FRONTEND_TOKEN, "e2e-unknown-0123456789abcdef"])
def test_without_a_scrape_or_admin_token_every_process_refuses(
    system: System, token: str | None
) -> None:
    urls = [
        f"{system.api_url}/metrics",
        f"{system.base_url}/metrics",
        *(worker_url(system, name) for name in ("worker", "prewarm", "beat")),
    ]
    expected = 403 if token == FRONTEND_TOKEN else 401
    for url in urls:
        answer = scrape(url, token)
        assert answer.status_code == expected, (url, answer.text)
        assert answer.headers["Content-Type"].startswith("application/problem+json"), url
    for url in urls:
        assert scrape(url, ADMIN_TOKEN).status_code == 200, url
