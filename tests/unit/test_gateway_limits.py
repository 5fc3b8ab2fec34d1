"""The gateway's rate limit: event streams and terminals opened per client address, in the same
Redis count as the API's browser calls. The gateway runs in-process against the suite's real
Redis; the windows are an hour long, so the gateway's real clock never lets one pass."""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.adapters.rate_limits import RateLimiter, RateScope
from shared.config_limits import Limits, Rate
from tests.conftest import flush_database
from tests.unit.test_gateway_events import KUBECONFIG, Answer, Env, Http, bearer, events_url, fetch

HOURLY = 3600.0


def limited(count: int, **more: Any) -> Limits:
    return Limits(
        creates_per_user=None,
        creates_per_frontend_token=None,
        browser_per_ip=Rate(count, HOURLY),
        **more,
    )


@pytest.fixture
def env(redis_url: str, tmp_path: Path) -> Iterator[Env]:
    flush_database(redis_url)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(KUBECONFIG)
    made = Env(redis_url, kubeconfig)
    yield made
    made.redis.close()
    flush_database(redis_url)


def assert_rate_limited(answer: Answer, *, limit: str) -> None:
    assert answer.status == 429, answer.body
    assert answer.headers["Content-Type"].startswith("application/problem+json")
    assert answer.headers["Cache-Control"] == "no-store"
    assert 1 <= int(answer.headers["Retry-After"]) <= HOURLY
    problem = json.loads(answer.body)
    assert problem["type"] == "urn:labvirt:problem:rate_limited"
    assert problem["status"] == 429
    assert problem["code"] == "rate_limited"
    assert problem["scope"] == "client_ip"
    assert problem["limit"] == limit
    assert problem["detail"].startswith("too many requests")


def test_event_streams_are_limited_per_client_address(env: Env) -> None:
    session_id, token = env.finished_session()

    async def three_streams(http: Http) -> list[Answer]:
        return [await fetch(http, events_url(session_id), bearer(token)) for _ in range(3)]

    answers = env.serve(three_streams, limits=limited(2))

    assert [a.status for a in answers[:2]] == [200, 200]
    assert_rate_limited(answers[2], limit="2/3600s")
    assert env.sweeper.connected(session_id) == 0  # a refused stream never connected


def test_the_gateway_shares_the_count_with_the_apis_browser_calls(env: Env) -> None:
    """Heartbeats the API counted for this address leave no stream or terminal to open."""
    session_id, token = env.open_session()
    env.mark_ready(session_id)
    RateLimiter(env.redis).check(RateScope.CLIENT_IP, "127.0.0.1", Rate(1, HOURLY), now=time.time())

    async def stream_and_terminal(http: Http) -> list[Answer]:
        ticket = env.ticket(session_id)
        return [
            await fetch(http, events_url(session_id), bearer(token)),
            await fetch(http, f"/v1/sessions/{session_id}/terminal?vm=ubuntu&ticket={ticket}"),
        ]

    for answer in env.serve(stream_and_terminal, limits=limited(1)):
        assert_rate_limited(answer, limit="1/3600s")


def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_count(env: Env) -> None:
    session_id, token = env.finished_session()

    async def from_clients(http: Http) -> list[int]:
        statuses = []
        for client in ("198.51.100.7", "198.51.100.8", "198.51.100.7"):
            headers = {**bearer(token), "X-Forwarded-For": client}
            statuses.append((await fetch(http, events_url(session_id), headers)).status)
        return statuses

    proxies = (ipaddress.ip_network("127.0.0.0/8"),)
    assert env.serve(from_clients, limits=limited(1, trusted_proxies=proxies)) == [200, 200, 429]


def test_forwarded_for_from_an_untrusted_peer_counts_for_the_peer(env: Env) -> None:
    session_id, token = env.finished_session()

    async def spoofing(http: Http) -> list[int]:
        statuses = []
        for spoofed in ("198.51.100.7", "198.51.100.8"):
            headers = {**bearer(token), "X-Forwarded-For": spoofed}
            statuses.append((await fetch(http, events_url(session_id), headers)).status)
        return statuses

    assert env.serve(spoofing, limits=limited(1)) == [200, 429]
