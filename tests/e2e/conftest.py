"""The whole system for end-to-end tests: real Redis, real processes, the simulator over HTTP."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.harness import System, start_system


@pytest.fixture(scope="session")
def system(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    running = start_system(redis_url, tmp_path_factory.mktemp("system"))
    try:
        yield running
    finally:
        running.stop()
