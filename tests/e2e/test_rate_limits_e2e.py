"""A rate limit holds across API processes: two `labvirt api` sharing one Redis count together."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import requests

from shared.adapters.redis_server import free_port
from tests.e2e.harness import FRONTEND_TOKEN, Proc, System, start, wait_until

pytestmark = pytest.mark.e2e


def _ready(url: str, proc: Proc) -> bool:
    if proc.process.poll() is not None:
        raise AssertionError(f"{proc.name} exited early:\n{proc.tail()}")
    try:
        return requests.get(f"{url}/readyz", timeout=1).status_code == 200
    except requests.ConnectionError:
        return False


def test_creates_per_user_are_counted_across_two_api_processes(
    system: System, tmp_path: Path
) -> None:
    env = dict(system.env, LABVIRT_LIMIT_CREATES_PER_USER="3/hour")
    apis: list[tuple[Proc, str]] = []
    created: list[str] = []
    try:
        for name in ("api-a", "api-b"):
            port = free_port()
            argv = [sys.executable, "-m", "labvirt.cli", "api"]
            proc = start(name, argv, dict(env, LABVIRT_API_PORT=str(port)), tmp_path)
            apis.append((proc, f"http://127.0.0.1:{port}"))
        for proc, url in apis:
            ready = functools.partial(_ready, url, proc)
            wait_until(ready, timeout=60, what=f"{proc.name} to be ready")

        def create(api: int, user: str) -> requests.Response:
            response = requests.post(
                f"{apis[api][1]}/v1/sessions",
                json={"template": "ubuntu", "user": user},
                headers={"Authorization": f"Bearer {FRONTEND_TOKEN}"},
                timeout=10,
            )
            if response.status_code == 201:
                created.append(response.json()["id"])
            return response

        # A first create and two reloads, alternating between the processes: three in all.
        answers = [create(i % 2, "limited-learner") for i in range(4)]

        assert [a.status_code for a in answers] == [201, 200, 200, 429], answers[-1].text
        refused = answers[-1]
        assert refused.headers["Content-Type"].startswith("application/problem+json")
        assert 3000 < int(refused.headers["Retry-After"]) <= 3600
        problem = refused.json()
        assert (problem["code"], problem["scope"], problem["limit"]) == (
            "rate_limited",
            "user",
            "3/3600s",
        )
        assert create(0, "limited-learner").status_code == 429
        assert create(0, "another-learner").status_code == 201
    finally:
        for session_id in created:
            system.call("DELETE", f"/v1/sessions/{session_id}")
        for proc, _url in apis:
            proc.stop()
