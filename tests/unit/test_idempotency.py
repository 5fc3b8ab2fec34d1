"""Idempotency records on the suite's real Redis: claim-or-get, complete, release, scoped per
credential, sealed so Redis holds neither the answer's token nor the key nor the credential."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import redis

from shared.adapters.idempotency import (
    CLAIM_SECONDS,
    PREFIX,
    Claimed,
    Completed,
    CorruptRecord,
    IdempotencyScope,
    IdempotencyStore,
    InFlight,
    StoredResponse,
    body_fingerprint,
)
from shared.config import ConfigError, Settings

CREDENTIAL = "frontend-token-0123456789"
OTHER_CREDENTIAL = "another-frontend-token-0123"
KEY = "order-7f3c-retry-safe"
TTL = 3600
SESSION_TOKEN = "lvs_9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a"
FINGERPRINT = body_fingerprint({"template": "ubuntu", "user": "alice"})
CREATED = StoredResponse(
    status=201,
    body=json.dumps({"id": "s-" + "a" * 24, "token": SESSION_TOKEN}),
    content_type="application/json",
    location="/v1/sessions/s-" + "a" * 24,
)


@pytest.fixture
def client(connect: Callable[[], redis.Redis]) -> redis.Redis:
    return connect()


@pytest.fixture
def store(client: redis.Redis) -> IdempotencyStore:
    return IdempotencyStore(client, ttl_seconds=TTL)


def scope(credential: str = CREDENTIAL, key: str = KEY) -> IdempotencyScope:
    return IdempotencyScope.derive(credential=credential, idempotency_key=key)


def claimed(store: IdempotencyStore, where: IdempotencyScope) -> Claimed:
    outcome = store.claim(where, FINGERPRINT)
    assert isinstance(outcome, Claimed), outcome
    return outcome


# -- claim, complete, release -----------------------------------------------------------------


def test_the_first_claim_holds_the_key_for_a_short_while(
    store: IdempotencyStore, client: redis.Redis
) -> None:
    claimed(store, scope())

    assert store.claim(scope(), FINGERPRINT) == InFlight(FINGERPRINT)
    assert 0 < client.ttl(scope().redis_key) <= CLAIM_SECONDS


def test_a_completed_claim_answers_every_later_claim_for_the_key_lifetime(
    store: IdempotencyStore, client: redis.Redis
) -> None:
    claim = claimed(store, scope())

    assert store.complete(scope(), claim, CREATED) is True

    assert store.claim(scope(), FINGERPRINT) == Completed(FINGERPRINT, CREATED)
    assert store.claim(scope(), "another body") == Completed(FINGERPRINT, CREATED)
    assert TTL - 5 < client.ttl(scope().redis_key) <= TTL


def test_a_claim_in_flight_tells_its_fingerprint_to_a_request_with_another_body(
    store: IdempotencyStore,
) -> None:
    claimed(store, scope())

    assert store.claim(scope(), "another body") == InFlight(FINGERPRINT)


def test_a_released_claim_frees_the_key(store: IdempotencyStore, client: redis.Redis) -> None:
    claim = claimed(store, scope())

    assert store.release(scope(), claim) is True

    assert client.exists(scope().redis_key) == 0
    claimed(store, scope())


def test_a_claim_that_expired_and_was_taken_again_is_no_longer_its_holder_s(
    store: IdempotencyStore, client: redis.Redis
) -> None:
    stale = claimed(store, scope())
    client.delete(scope().redis_key)  # what the claim's TTL does to a request that hung
    current = claimed(store, scope())

    assert store.complete(scope(), stale, CREATED) is False
    assert store.release(scope(), stale) is False

    assert store.claim(scope(), FINGERPRINT) == InFlight(FINGERPRINT)
    assert store.complete(scope(), current, CREATED) is True
    assert store.claim(scope(), FINGERPRINT) == Completed(FINGERPRINT, CREATED)


def test_keys_are_scoped_per_credential(store: IdempotencyStore) -> None:
    mine = claimed(store, scope(CREDENTIAL))
    store.complete(scope(CREDENTIAL), mine, CREATED)

    assert scope(CREDENTIAL).redis_key != scope(OTHER_CREDENTIAL).redis_key
    claimed(store, scope(OTHER_CREDENTIAL))
    assert store.claim(scope(CREDENTIAL), FINGERPRINT) == Completed(FINGERPRINT, CREATED)


def test_derivation_keeps_credential_and_key_apart() -> None:
    assert scope("ab", "c").redis_key != scope("a", "bc").redis_key
    assert scope("ab", "c").seal_key != scope("a", "bc").seal_key
    assert scope().redis_key == scope().redis_key
    assert scope().redis_key.startswith(f"{PREFIX}:")


# -- sealing ----------------------------------------------------------------------------------


def test_a_record_opens_under_its_own_scope_only() -> None:
    record = {"state": "done", "body": SESSION_TOKEN}
    sealed = scope().seal(record)

    assert scope().open(sealed) == record
    assert scope().seal(record) != sealed  # a fresh nonce every time
    with pytest.raises(CorruptRecord):
        scope(OTHER_CREDENTIAL).open(sealed)
    with pytest.raises(CorruptRecord):
        scope(key="another-key").open(sealed)


def test_an_altered_record_does_not_open() -> None:
    sealed = bytearray(scope().seal({"state": "done"}))
    sealed[-1] ^= 1

    with pytest.raises(CorruptRecord):
        scope().open(bytes(sealed))


def test_a_record_moved_under_another_redis_key_does_not_open() -> None:
    original = scope()
    moved = IdempotencyScope(redis_key=f"{PREFIX}:elsewhere", seal_key=original.seal_key)

    with pytest.raises(CorruptRecord):
        moved.open(original.seal({"state": "done"}))


def test_a_corrupt_record_in_redis_is_reported_not_trusted(
    store: IdempotencyStore, client: redis.Redis
) -> None:
    client.set(scope().redis_key, b"not a sealed record at all")

    with pytest.raises(CorruptRecord):
        store.claim(scope(), FINGERPRINT)


def test_redis_holds_neither_the_token_nor_the_key_nor_the_credential(
    store: IdempotencyStore, client: redis.Redis
) -> None:
    claim = claimed(store, scope())
    in_flight = {name: client.get(name) for name in client.scan_iter()}
    store.complete(scope(), claim, CREATED)
    done = {name: client.get(name) for name in client.scan_iter()}

    for stored in (in_flight, done):
        assert stored, "nothing was stored"
        for name, value in stored.items():
            assert value is not None
            for secret in (SESSION_TOKEN, KEY, CREDENTIAL, FINGERPRINT):
                for form in (secret.encode(), secret.encode().hex().encode()):
                    assert form not in name
                    assert form not in value


# -- fingerprints -----------------------------------------------------------------------------


def test_a_fingerprint_ignores_key_order_but_not_values() -> None:
    body = {"template": "ubuntu", "user": "alice", "location": {"lat": 1.5, "lon": 2.0}}
    reordered = {"location": {"lon": 2.0, "lat": 1.5}, "user": "alice", "template": "ubuntu"}

    assert body_fingerprint(body) == body_fingerprint(reordered)
    assert body_fingerprint(body) != body_fingerprint({**body, "user": "bob"})
    assert body_fingerprint(body) != body_fingerprint({**body, "replace": False})
    assert len(body_fingerprint(body)) == 64


# -- configuration ----------------------------------------------------------------------------


def test_the_key_lifetime_is_a_day_unless_configured() -> None:
    assert Settings.from_env({"LABVIRT_MODE": "dev"}).idempotency_ttl_seconds == 86400
    configured = Settings.from_env(
        {"LABVIRT_MODE": "dev", "LABVIRT_IDEMPOTENCY_TTL_SECONDS": "600"}
    )
    assert configured.idempotency_ttl_seconds == 600


@pytest.mark.parametrize("value", ["0", "a day", "1.5"])
def test_a_bad_key_lifetime_stops_the_process_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigError, match="LABVIRT_IDEMPOTENCY_TTL_SECONDS"):
        Settings.from_env({"LABVIRT_MODE": "dev", "LABVIRT_IDEMPOTENCY_TTL_SECONDS": value})
