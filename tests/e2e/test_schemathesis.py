"""The live API against its own contract.

schemathesis reads ``/openapi.json`` from a running ``labvirt api`` (with the gateway, workers,
beat and the simulator, as users run it) and calls every operation with a frontend token:
the documented examples, boundary values of every schema, fuzzed requests (valid and
invalid), and stateful sequences that follow the document's links from a create to the
session's routes. Every answer must be documented (status, content type, headers, body) and
none may be a 5xx. Admin routes answer the frontend token their documented 403.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import FRONTEND_TOKEN, System, start_system

pytestmark = pytest.mark.e2e

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
)
PHASES = ("examples", "coverage", "fuzzing", "stateful")
EXAMPLES_PER_OPERATION = 15
SEED = 20260101  # the same requests every run: a failure reproduces


@pytest.fixture
def system(own_redis_url: str, tmp_path: Path) -> Iterator[System]:
    """A system of its own: the sessions schemathesis opens crowd no other test."""
    running = start_system(
        own_redis_url,
        tmp_path,
        # Room enough that no create is refused with a (documented) 503 for a full region.
        extra_env={
            "LABVIRT_REGION_MAX_BOOTING": "1000",
            "LABVIRT_REGION_MAX_LIVE_SESSIONS": "1000",
        },
    )
    try:
        yield running
    finally:
        running.stop()


def run_schemathesis(api_url: str, workdir: Path) -> tuple[dict[str, Any], str]:
    report = workdir / "schemathesis.json"
    argv = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{api_url}/openapi.json",
        "--header",
        f"Authorization: Bearer {FRONTEND_TOKEN}",
        "--checks",
        ",".join(CHECKS),
        "--phases",
        ",".join(PHASES),
        "--max-examples",
        str(EXAMPLES_PER_OPERATION),
        "--seed",
        str(SEED),
        "--no-shrink",  # bounded time; the report names the failing request as it was
        "--workers",
        "1",
        "--request-timeout",
        "10",
        "--report",
        "json",
        "--report-json-path",
        str(report),
    ]
    # In a folder of its own: its report and hypothesis database stay out of the checkout.
    done = subprocess.run(
        argv, cwd=workdir, capture_output=True, text=True, timeout=150, check=False
    )
    output = done.stdout + done.stderr
    assert report.exists(), output
    result: dict[str, Any] = json.loads(report.read_text())
    return result, output


def test_every_answer_of_the_live_api_is_the_documented_one(system: System, tmp_path: Path) -> None:
    workdir = tmp_path / "schemathesis"
    workdir.mkdir()
    documented = system.http.get(f"{system.api_url}/openapi.json", timeout=10).json()
    # Every operation but the document itself, which schemathesis reads rather than tests.
    operations = sum(
        1
        for path, item in documented["paths"].items()
        for method in item
        if method != "parameters" and path != "/openapi.json"
    )

    result, output = run_schemathesis(system.api_url, workdir)

    assert result["failures"] == [], f"{output}\n{system.logs()}"
    assert result["errors"] == [], output
    assert result["exit_code"] == 0, output
    assert result["complete"], output
    assert result["operations"]["tested"] == operations, output
    phases = {name: phase["status"] for name, phase in result["phases"].items()}
    assert phases == dict.fromkeys(PHASES, "success"), output
    assert result["test_cases"]["generated"] >= operations * 5, output
