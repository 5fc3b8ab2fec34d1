"""Fixtures every test layer shares: a real Redis (the machine's, or an embedded one)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
import redis

from shared.adapters.redis_server import EmbeddedRedis, answers

# ../shared/kubevirt beside the checkout: KubeVirt's schema and examples, when present.
KUBEVIRT_REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "kubevirt"
_LOCK_KEY = "labvirt-test-run"
_LOCK_SECONDS = 3600


@contextlib.contextmanager
def claim_redis_database() -> Iterator[str]:
    """A Redis database of its own, flushed before and after use.

    The machine's Redis when one answers at REDIS_URL: the first free database from 15 down,
    claimed with a lock key so concurrent runs (and a developer's data in database 0) never
    share one. Otherwise a private embedded redis-server.
    """
    base = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    if not answers(base):
        embedded = EmbeddedRedis().start()
        try:
            yield embedded.url
        finally:
            embedded.stop()
        return
    for db in range(15, 0, -1):
        url = urlparse(base)._replace(path=f"/{db}").geturl()
        client = redis.Redis.from_url(url)
        if client.set(_LOCK_KEY, str(os.getpid()), nx=True, ex=_LOCK_SECONDS):
            client.flushdb()
            client.set(_LOCK_KEY, str(os.getpid()), ex=_LOCK_SECONDS)
            try:
                yield url
            finally:
                client.flushdb()
                client.close()
            return
        client.close()
    pytest.fail("every Redis database from 1 to 15 is claimed by another test run")


def flush_database(url: str) -> None:
    """FLUSHDB on a database this run claimed, keeping the claim (what a data loss looks like)."""
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
        client.set(_LOCK_KEY, str(os.getpid()), ex=_LOCK_SECONDS)
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with claim_redis_database() as url:
        yield url


@pytest.fixture(scope="session")
def kubevirt_reference() -> Path:
    if not KUBEVIRT_REFERENCE.is_dir():
        pytest.skip("../shared/kubevirt is not beside this checkout")
    return KUBEVIRT_REFERENCE
