"""A provisioning that can never succeed, end to end: every boot fails, the session gets one
fresh environment and then fails; its provisioning appears once in the dead letters; once the
cause is gone, `labvirt ops failed requeue` runs it to success and the record shows it all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import claim_redis_database
from tests.e2e.harness import ADMIN_TOKEN, System, start_system

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def failing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with claim_redis_database() as url:
        system = start_system(
            url,
            tmp_path_factory.mktemp("every-boot-fails"),
            sim_args=["--boot-failure-rate", "1.0", "--seed", "11"],
        )
        try:
            yield system
        finally:
            system.stop()


def ops(system: System, *argv: str) -> Any:
    """`labvirt ops --json ...` as an operator types it, against the running API."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("LABVIRT_")}
    env.update(
        {
            "LABVIRT_API_URL": system.api_url,
            "LABVIRT_ADMIN_TOKENS": ADMIN_TOKEN,
            "LABVIRT_OPERATOR": "on-call",
        }
    )
    done = subprocess.run(
        [str(Path(sys.executable).with_name("labvirt")), "ops", "--json", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_provisioning_that_cannot_succeed_is_requeued_to_success(failing: System) -> None:
    created = failing.create("ubuntu", "unlucky")
    failed = failing.wait_state(created["id"], "failed", timeout=60)
    assert "reached phase Failed" in failed["reason"]

    listed = ops(failing, "failed", "list", "--task", "labvirt.provision")
    [record] = listed["failed"]
    assert record["concerns"]["session_id"] == created["id"]
    assert record["status"] == "failed"
    assert "reached phase Failed" in record["error"]

    # The cause goes away (a fixed image, a healthy node); the operator requeues.
    faults = requests.put(
        f"{failing.sim.url}/_sim/faults", json={"boot_failure_rate": 0}, timeout=5
    )
    assert faults.status_code == 200, faults.text
    requeued = ops(failing, "failed", "requeue", record["id"])
    assert requeued["requeued"] is True
    ready = failing.wait_state(created["id"], "ready", timeout=60)
    assert [h["state"] for h in ready["history"]][-3:] == ["failed", "provisioning", "ready"]

    shown = ops(failing, "failed", "show", record["id"])
    assert shown["status"] == "resolved"
    assert shown["attempts"] == 1
    assert [bool(h.get("resolved")) for h in shown["history"]] == [False, True]
    assert [r["by"].split(" ")[0] for r in shown["requeues"]] == ["on-call"]
    response = failing.call("DELETE", f"/v1/sessions/{created['id']}")
    assert response.status_code == 202
