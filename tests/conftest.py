"""Fixtures every test layer shares: a real Redis (the machine's, or an embedded one)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
import redis

from shared.adapters.redis_server import EmbeddedRedis, answers

# ../shared/kubevirt beside the checkout: KubeVirt's schema and examples, when present.
KUBEVIRT_REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "kubevirt"
TEST_DB = 14


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis database for this test run, flushed before use.

    The machine's Redis when one answers at REDIS_URL (a database of its own, so a developer's
    data is safe); otherwise a private embedded redis-server.
    """
    base = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    embedded = None
    if answers(base):
        url = urlparse(base)._replace(path=f"/{TEST_DB}").geturl()
    else:
        embedded = EmbeddedRedis().start()
        url = embedded.url
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    yield url
    if embedded is not None:
        embedded.stop()


@pytest.fixture(scope="session")
def kubevirt_reference() -> Path:
    if not KUBEVIRT_REFERENCE.is_dir():
        pytest.skip("../shared/kubevirt is not beside this checkout")
    return KUBEVIRT_REFERENCE
