"""One-time tickets against a real Redis: once only, for one session, 30 s, stored as a hash."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio

from shared.adapters.tickets import PREFIX, TICKET_SECONDS, issue_ticket, redeem_ticket
from tests.conftest import flush_database

NOW = 1_700_000_000.0
SESSION = "s-" + "a" * 24
OTHER = "s-" + "b" * 24
# Nothing listens here: a redeem that reached Redis through it would raise ConnectionError.
NOWHERE = "redis://127.0.0.1:1/0"


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    flush_database(redis_url)
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()
    flush_database(redis_url)


def redeem(url: str, ticket: str, session_id: str) -> bool:
    async def attempt() -> bool:
        connection = redis.asyncio.Redis.from_url(url, socket_connect_timeout=1)
        try:
            return await redeem_ticket(connection, ticket, session_id)
        finally:
            await connection.aclose()

    return asyncio.run(attempt())


def ticket_key(ticket: str) -> str:
    return f"{PREFIX}:{hashlib.sha256(ticket.encode()).hexdigest()}"


def test_a_ticket_opens_its_session_once(client: redis.Redis, redis_url: str) -> None:
    ticket, expires_at = issue_ticket(client, SESSION, now=NOW)

    assert expires_at == NOW + TICKET_SECONDS
    assert redeem(redis_url, ticket, SESSION) is True
    assert redeem(redis_url, ticket, SESSION) is False
    assert client.exists(ticket_key(ticket)) == 0


def test_tickets_are_random_and_independent(client: redis.Redis, redis_url: str) -> None:
    first, _ = issue_ticket(client, SESSION, now=NOW)
    second, _ = issue_ticket(client, SESSION, now=NOW)

    assert first != second
    assert redeem(redis_url, first, SESSION) is True
    assert redeem(redis_url, second, SESSION) is True


def test_a_ticket_tried_on_another_session_is_refused_and_spent(
    client: redis.Redis, redis_url: str
) -> None:
    ticket, _ = issue_ticket(client, SESSION, now=NOW)

    assert redeem(redis_url, ticket, OTHER) is False
    # Whoever held it does not get a second try, not even on the right session.
    assert redeem(redis_url, ticket, SESSION) is False


def test_concurrent_redeems_of_one_ticket_let_exactly_one_through(
    client: redis.Redis, redis_url: str
) -> None:
    ticket, _ = issue_ticket(client, SESSION, now=NOW)

    async def race() -> list[bool]:
        clients = [redis.asyncio.Redis.from_url(redis_url) for _ in range(8)]
        try:
            return list(await asyncio.gather(*(redeem_ticket(c, ticket, SESSION) for c in clients)))
        finally:
            for c in clients:
                await c.aclose()

    assert sorted(asyncio.run(race())) == [False] * 7 + [True]


def test_only_a_hash_of_the_ticket_is_stored(client: redis.Redis) -> None:
    ticket, _ = issue_ticket(client, SESSION, now=NOW)

    stored: list[Any] = []
    for key in client.scan_iter(count=1000):
        stored.append(key)
        if client.type(key) == b"string":
            stored.append(client.get(key) or b"")
    assert ticket_key(ticket).encode() in stored
    assert client.get(ticket_key(ticket)) == SESSION.encode()
    assert not any(ticket.encode() in item for item in stored)


def test_a_ticket_lives_thirty_seconds(client: redis.Redis) -> None:
    ticket, _ = issue_ticket(client, SESSION, now=NOW)

    ttl = client.pttl(ticket_key(ticket))

    assert (TICKET_SECONDS - 1) * 1000 < ttl <= TICKET_SECONDS * 1000


def test_an_expired_ticket_is_refused(client: redis.Redis, redis_url: str) -> None:
    ticket, _ = issue_ticket(client, SESSION, now=NOW)
    client.pexpire(ticket_key(ticket), 1)
    time.sleep(0.01)

    assert redeem(redis_url, ticket, SESSION) is False


@pytest.mark.parametrize("ticket", ["", "x" * 129, "x" * 10_000])
def test_empty_and_overlong_tickets_are_refused_without_asking_redis(ticket: str) -> None:
    assert redeem(NOWHERE, ticket, SESSION) is False


@pytest.mark.parametrize("ticket", ["x" * 128, "not a ticket", "ünïcode\n\x00", "../../etc"])
def test_unknown_tickets_are_refused(client: redis.Redis, redis_url: str, ticket: str) -> None:
    issue_ticket(client, SESSION, now=NOW)

    assert redeem(redis_url, ticket, SESSION) is False
