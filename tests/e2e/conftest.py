"""The whole system for end-to-end tests: real Redis, real processes, the simulator over HTTP.

Every system of real processes gets a Redis of its own (``own_redis_url``): its beat reaps and
its workers take tasks from that database alone, never from the one the unit tests share.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import claim_redis_database
from tests.e2e.chaos_measures import ClassRun, fault_free_run
from tests.e2e.harness import System, start_system


@pytest.fixture
def own_redis_url() -> Iterator[str]:
    """A Redis for one test's processes alone."""
    with claim_redis_database() as url:
        yield url


@pytest.fixture(scope="session")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with claim_redis_database() as url:
        running = start_system(url, tmp_path_factory.mktemp("system"))
        try:
            yield running
        finally:
            running.stop()


@pytest.fixture(scope="session")
def fault_free(tmp_path_factory: pytest.TempPathFactory) -> ClassRun:
    """A chaos-sized class with nothing going wrong, once for the run: what every chaos
    scenario (``test_chaos``, ``test_chaos_recovery``) is held to."""
    return fault_free_run(tmp_path_factory.mktemp("fault-free"))
