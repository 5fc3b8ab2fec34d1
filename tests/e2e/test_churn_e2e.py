"""Churn through real processes, small: 20 create + teardown cycles, 10 at a time, on the
shared system, then one reconcile pass, and nothing of them may be left behind: no object of
their environments in the simulator, no live session, no key of those sessions in Redis that
outlives the ended retention.

``python -m benchmarks.churn_bench`` runs 1,000 cycles on a system of its own
(docs/BENCHMARKS.md).
"""

from __future__ import annotations

import secrets

import pytest
import redis

from benchmarks.churn_bench import churn
from tests.e2e.harness import System

pytestmark = pytest.mark.e2e


def test_twenty_create_and_teardown_cycles_leave_nothing_behind(system: System) -> None:
    client = redis.Redis.from_url(system.redis_url)
    try:
        report = churn(
            system,
            client,
            cycles=20,
            concurrency=10,
            user_prefix=f"churn-{secrets.token_hex(4)}",
            whole_system=False,  # other tests' sessions share this system
        )
    finally:
        client.close()

    assert report["final_states"] == {"ended": 20}, system.logs()
    leftovers = report["leftovers"]
    assert leftovers["cluster"] == {"vmis": 0, "services": 0, "network_policies": 0}
    assert leftovers["live_sessions"] == 0
    assert leftovers["redis"]["problems"] == 0, leftovers["redis"]["problem_examples"]
