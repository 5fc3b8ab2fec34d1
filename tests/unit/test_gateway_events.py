"""``GET /v1/sessions/{id}/events`` at the gateway: a session's progress as server-sent events.

The gateway runs in-process (aiohttp's test server) against a real Redis: the stream's wake-up
is a Redis PUBLISH, and its connection is a lease in Redis. Each test runs its own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

from services.gateway.app import create_app
from services.gateway.events import EventHub
from shared.adapters.connections import ConnectionSweeper
from shared.adapters.session_events import NOTIFY_CHANNEL, SessionEvents
from shared.adapters.session_store import RedisSessionStore
from shared.adapters.tickets import issue_ticket
from shared.config import Cluster, Mode, Settings
from shared.domain.lifecycle import ProgressEvent, SessionClocks, Stage, start_session
from shared.domain.reasons import CloseReason
from shared.domain.sessions import VmView
from tests.conftest import flush_database

T = TypeVar("T")
Http = TestClient[Any, Any]

FRONTEND = "frontend-3f786850e387550fdab836ed7e6dc881"  # strong, as the start-up check wants
ADMIN = "admin-e9d71f5ee7c92d6dc9e92ffdad17b8bd"
NOW = 1_700_000_000.0
CLOCKS = SessionClocks(
    max_lifetime_seconds=7200,
    idle_timeout_seconds=300,
    startup_timeout_seconds=600,
    extend_step_seconds=1800,
    hard_deadline_seconds=14400,
)
VMS = [VmView(name="ubuntu", hostname="ubuntu", ip="10.0.0.2", phase="Running", ready=True)]
# The gateway reads its clusters' kubeconfigs at start (for terminals); nothing listens here.
KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: http://127.0.0.1:1
contexts:
- name: local
  context:
    cluster: local
    user: tester
current-context: local
users:
- name: tester
  user:
    token: not-a-real-token
"""
# Long enough that a keep-alive's poll cannot pass for the pub/sub wake-up.
NO_KEEPALIVE = 30.0
READ_SECONDS = 5.0  # the longest any read may wait before the test fails


class Env:
    """A real Redis, the session store over it, and the gateway's settings."""

    def __init__(self, redis_url: str, kubeconfig: Path) -> None:
        self.redis = redis.Redis.from_url(redis_url)
        self.store = RedisSessionStore(self.redis)
        self.events = SessionEvents(self.redis)
        self.sweeper = ConnectionSweeper(self.redis)
        self.settings = Settings(
            mode=Mode.DEV,
            redis_url=redis_url,
            frontend_tokens=frozenset({FRONTEND}),
            admin_tokens=frozenset({ADMIN}),
            clusters=(Cluster("local", kubeconfig, None, "default"),),
        )

    def serve(self, scenario: Callable[[Http], Awaitable[T]], **settings: Any) -> T:
        """Run ``scenario`` against a gateway of its own, in an event loop of its own."""

        async def main() -> T:
            app = create_app(dataclasses.replace(self.settings, **settings))
            async with TestClient(TestServer(app)) as http:
                # Stopping the gateway while its subscription is still being set up can hang
                # (see test_the_event_hub_stops_even_if_its_first_cancel_is_swallowed).
                await until_subscribed(self.redis)
                return await scenario(http)

        try:
            return asyncio.run(main())
        finally:
            await_unsubscribed(self.redis)

    def open_session(self, *, user: str = "alice") -> tuple[str, str]:
        session, token = start_session(
            user=user, template="ubuntu", region="local", clocks=CLOCKS, now=NOW
        )
        self.store.add(session)
        return session.id, token

    def mark_ready(self, session_id: str) -> None:
        self.store.update(session_id, lambda s: s.mark_ready(vms=VMS, at=NOW + 5))

    def close(self, session_id: str, *, at: float = NOW + 9) -> None:
        self.store.update(session_id, lambda s: s.close(CloseReason.CLOSED, at=at))

    def finished_session(self) -> tuple[str, str]:
        """A session that went through every stage to ``ended`` (reason ``closed``)."""
        session_id, token = self.open_session()
        self.events.emit(session_id, ProgressEvent(Stage.CREATING, NOW + 1, {"vms": 1}))
        self.mark_ready(session_id)
        self.close(session_id)
        self.store.update(session_id, lambda s: s.finish(at=NOW + 20))
        return session_id, token

    def ticket(self, session_id: str) -> str:
        return issue_ticket(self.redis, session_id, now=NOW)[0]


@pytest.fixture
def env(redis_url: str, tmp_path: Path) -> Iterator[Env]:
    flush_database(redis_url)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(KUBECONFIG)
    made = Env(redis_url, kubeconfig)
    yield made
    made.redis.close()
    flush_database(redis_url)


def parse_sse(text: str) -> list[dict[str, str]]:
    """Events of an SSE body, each a dict of its fields (comments kept as ``comment``)."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            name, _, value = line.partition(":")
            fields[name or "comment"] = value.removeprefix(" ")
        events.append(fields)
    return events


def events_url(session_id: str, **query: str) -> str:
    url = f"/v1/sessions/{session_id}/events"
    if query:
        url += "?" + "&".join(f"{k}={v}" for k, v in query.items())
    return url


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Answer:
    """A whole (finite) answer: status, headers and body."""

    def __init__(self, status: int, headers: dict[str, str], body: str) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def events(self) -> list[dict[str, str]]:
        return parse_sse(self.body)

    def error(self) -> dict[str, Any]:
        """The problem document (RFC 9457), the same shape as the API's."""
        assert self.headers["Content-Type"].startswith("application/problem+json"), self.headers
        body: dict[str, Any] = json.loads(self.body)
        assert body["type"] == f"urn:labvirt:problem:{body['code']}", body
        assert body["status"] == self.status, body
        assert isinstance(body["title"], str), body
        assert isinstance(body["detail"], str), body
        return body


async def fetch(http: Http, url: str, headers: dict[str, str] | None = None) -> Answer:
    async with http.get(url, headers=headers or {}) as response:
        body = await asyncio.wait_for(response.text(), READ_SECONDS)
        return Answer(response.status, dict(response.headers), body)


def get(env: Env, url: str, headers: dict[str, str] | None = None, **settings: Any) -> Answer:
    return env.serve(lambda http: fetch(http, url, headers), **settings)


async def next_block(response: ClientResponse) -> dict[str, str]:
    """The next event (or comment) of an open stream."""
    raw = await asyncio.wait_for(response.content.readuntil(b"\n\n"), READ_SECONDS)
    (block,) = parse_sse(raw.decode())
    return block


def subscribers(client: redis.Redis) -> int:
    ((_channel, count),) = client.pubsub_numsub(NOTIFY_CHANNEL)
    return int(count)


async def until_subscribed(client: redis.Redis) -> None:
    """Until the gateway's one subscription to the append notices is in place."""
    deadline = time.monotonic() + READ_SECONDS
    while not subscribers(client):
        if time.monotonic() > deadline:
            pytest.fail("the gateway never subscribed to the append notices")
        await asyncio.sleep(0.005)


def await_unsubscribed(client: redis.Redis) -> None:
    """Until a stopped gateway's subscription is gone (so the next one's is told apart)."""
    deadline = time.monotonic() + READ_SECONDS
    while subscribers(client) and time.monotonic() < deadline:
        time.sleep(0.005)


def stream_ids(events: list[dict[str, str]]) -> list[tuple[int, int]]:
    return [(int(e["id"].split("-")[0]), int(e["id"].split("-")[1])) for e in events]


# -- a whole session's life --------------------------------------------------------------------


def test_the_stream_replays_every_stage_in_order_and_ends_after_the_last(env: Env) -> None:
    session_id, token = env.finished_session()

    answer = get(env, events_url(session_id), bearer(token))

    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/event-stream")
    assert answer.headers["Cache-Control"] == "no-store"
    events = answer.events
    assert events[0] == {"retry": "2000"}
    assert [e["event"] for e in events[1:]] == ["queued", "creating", "ready", "ended"]
    ids = stream_ids(events[1:])
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    ended = json.loads(events[-1]["data"])
    assert ended["stage"] == "ended"
    assert ended["reason"] == "closed"
    assert json.loads(events[2]["data"])["vms"] == 1


def test_a_reconnect_resumes_after_the_last_event_id_header(env: Env) -> None:
    session_id, token = env.finished_session()
    everything = get(env, events_url(session_id), bearer(token)).events[1:]

    resumed = get(
        env, events_url(session_id), {**bearer(token), "Last-Event-ID": everything[1]["id"]}
    )

    assert resumed.status == 200
    assert resumed.events[0] == {"retry": "2000"}
    assert resumed.events[1:] == everything[2:]


def test_a_reconnect_resumes_after_the_last_event_id_in_the_query(env: Env) -> None:
    session_id, token = env.finished_session()
    everything = get(env, events_url(session_id), bearer(token)).events[1:]

    resumed = get(env, events_url(session_id, last_event_id=everything[0]["id"]), bearer(token))

    assert resumed.events[1:] == everything[1:]


def test_a_reconnect_after_the_end_is_204_so_eventsource_stops(env: Env) -> None:
    session_id, token = env.finished_session()
    last = get(env, events_url(session_id), bearer(token)).events[-1]["id"]

    answer = get(env, events_url(session_id), {**bearer(token), "Last-Event-ID": last})

    assert answer.status == 204
    assert answer.body == ""


@pytest.mark.parametrize("where", ["header", "query"])
@pytest.mark.parametrize("last", ["yesterday", "1-2-3", "-1", "1-", "9" * 21 + "-0"])
def test_a_malformed_last_event_id_is_400(env: Env, where: str, last: str) -> None:
    session_id, token = env.finished_session()
    if where == "header":
        answer = get(env, events_url(session_id), {**bearer(token), "Last-Event-ID": last})
    else:
        answer = get(env, events_url(session_id, last_event_id=last), bearer(token))

    assert answer.status == 400
    assert answer.error()["code"] == "invalid_last_event_id"


def test_a_refused_stream_does_not_count_as_a_connection(env: Env) -> None:
    session_id, token = env.open_session()
    env.mark_ready(session_id)

    answer = get(env, events_url(session_id), {**bearer(token), "Last-Event-ID": "yesterday"})

    assert answer.status == 400
    assert env.sweeper.disconnected_since(session_id) is None


# -- a live stream -----------------------------------------------------------------------------


def test_a_live_stream_sends_keep_alives_while_nothing_happens(env: Env) -> None:
    session_id, token = env.open_session()
    env.mark_ready(session_id)

    async def scenario(http: Http) -> tuple[list[dict[str, str]], float, bytes]:
        response = await http.get(events_url(session_id), headers=bearer(token))
        assert response.status == 200
        received = [await next_block(response) for _ in range(3)]  # retry, queued, ready
        started = time.monotonic()
        received.append(await next_block(response))  # ... then a keep-alive
        received.append(await next_block(response))  # ... and another
        elapsed = time.monotonic() - started
        await asyncio.to_thread(env.close, session_id)
        rest = await asyncio.wait_for(response.content.read(), READ_SECONDS)
        response.release()
        return received, elapsed, rest

    events, elapsed, rest = env.serve(scenario, events_keepalive_seconds=0.5)

    assert events[0] == {"retry": "2000"}
    assert [e.get("event") for e in events[1:3]] == ["queued", "ready"]
    assert events[3:5] == [{"comment": "keep-alive"}] * 2
    assert 0.9 < elapsed < 3.0  # two intervals of 0.5 s
    tail = parse_sse(rest.decode())
    assert [e.get("event") for e in tail if "comment" not in e] == ["ended"]


def test_an_event_appended_while_the_stream_is_open_arrives_at_once(env: Env) -> None:
    session_id, token = env.open_session()
    env.mark_ready(session_id)

    async def scenario(http: Http) -> tuple[list[dict[str, str]], float, bytes]:
        response = await http.get(events_url(session_id), headers=bearer(token))
        received = [await next_block(response) for _ in range(3)]  # retry, queued, ready
        started = time.monotonic()
        warning = ProgressEvent(Stage.EXPIRING_SOON, NOW + 6, {"seconds_left": 60})
        await asyncio.to_thread(env.events.emit, session_id, warning)
        received.append(await next_block(response))
        await asyncio.to_thread(env.close, session_id)
        received.append(await next_block(response))
        elapsed = time.monotonic() - started
        rest = await asyncio.wait_for(response.content.read(), READ_SECONDS)
        response.release()
        return received, elapsed, rest

    events, elapsed, rest = env.serve(scenario, events_keepalive_seconds=NO_KEEPALIVE)

    assert [e.get("event") for e in events[1:]] == ["queued", "ready", "expiring-soon", "ended"]
    assert json.loads(events[3]["data"])["seconds_left"] == 60
    assert json.loads(events[4]["data"])["reason"] == "closed"
    assert elapsed < 2.0  # woken by the notice, not by a poll 30 s later
    assert rest == b""  # and the stream ended after ``ended``
    ids = stream_ids(events[1:])
    assert ids == sorted(ids)


def test_a_stream_wakes_for_its_own_session_only(env: Env) -> None:
    session_id, token = env.open_session()
    env.mark_ready(session_id)
    other_id, _ = env.open_session(user="bob")

    async def scenario(http: Http) -> list[dict[str, str]]:
        response = await http.get(events_url(session_id), headers=bearer(token))
        received = [await next_block(response) for _ in range(3)]
        await asyncio.to_thread(env.mark_ready, other_id)
        await asyncio.to_thread(env.close, session_id)
        received.append(await next_block(response))
        response.release()
        return received

    events = env.serve(scenario, events_keepalive_seconds=NO_KEEPALIVE)

    assert [e.get("event") for e in events[1:]] == ["queued", "ready", "ended"]


def test_an_open_stream_holds_the_session_connected_until_it_closes(env: Env) -> None:
    session_id, token = env.open_session()
    env.mark_ready(session_id)

    async def scenario(http: Http) -> tuple[int, dict[str, Any]]:
        response = await http.get(events_url(session_id), headers=bearer(token))
        for _ in range(3):
            await next_block(response)
        connected = env.sweeper.connected(session_id)
        health = await (await http.get("/healthz")).json()
        response.close()  # the tab goes away
        deadline = time.monotonic() + READ_SECONDS
        while env.sweeper.disconnected_since(session_id) is None:
            assert time.monotonic() < deadline, "the closed stream never released its lease"
            await asyncio.sleep(0.05)
        return connected, health

    connected, health = env.serve(scenario, events_keepalive_seconds=0.5)

    assert connected == 1
    assert health["event_streams"] == 1
    assert env.sweeper.connected(session_id) == 0


# -- who may follow a session ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("how", "status"),
    [
        ("none", 401),
        ("other-header", 404),
        ("other-query", 404),
        ("garbage", 404),
        ("header", 200),
        ("query", 200),
        ("frontend", 200),
        ("admin", 200),
        ("ticket", 200),
    ],
)
def test_who_may_follow_a_session(env: Env, how: str, status: int) -> None:
    session_id, token = env.finished_session()
    _, other = env.open_session(user="bob")
    url, headers = events_url(session_id), {}
    if how == "other-header":
        headers = bearer(other)
    elif how == "other-query":
        url = events_url(session_id, token=other)
    elif how == "garbage":
        headers = bearer("not-a-token")
    elif how == "header":
        headers = bearer(token)
    elif how == "query":  # deprecated, but it works for one more release
        url = events_url(session_id, token=token)
    elif how == "frontend":
        headers = bearer(FRONTEND)
    elif how == "admin":
        headers = bearer(ADMIN)
    elif how == "ticket":
        url = events_url(session_id, ticket=env.ticket(session_id))

    answer = get(env, url, headers)

    assert answer.status == status, answer.body
    if status == 200:
        assert [e.get("event") for e in answer.events][-1] == "ended"
    else:
        error = answer.error()
        assert error["code"] == {401: "unauthorized", 404: "not_found"}[status]
        assert answer.headers["Cache-Control"] == "no-store"


def test_an_unknown_session_is_404_like_someone_elses(env: Env) -> None:
    absent = "s-" + "0" * 24

    for url in (events_url(absent), events_url("not-a-session-id")):
        answer = get(env, url, bearer(FRONTEND))
        assert answer.status == 404
        assert answer.error()["code"] == "not_found"


async def raw_request(http: Http, head: bytes) -> tuple[int, dict[str, str], str]:
    """One request written byte for byte (a client library would not send invalid UTF-8)."""
    reader, writer = await asyncio.open_connection(http.host, http.port)
    try:
        writer.write(head)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), READ_SECONDS)
    finally:
        writer.close()
    status_line, _, rest = raw.decode("latin-1").partition("\r\n")
    header_block, _, body = rest.partition("\r\n\r\n")
    headers = dict(line.split(": ", 1) for line in header_block.split("\r\n") if line)
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize(
    "token", [b"\xff\xfe" * 12, b"caf\xc3\xa9-" + b"x" * 20, b"\xed\xa0\x80" * 8]
)
def test_a_bearer_token_outside_printable_ascii_is_401(env: Env, token: bytes) -> None:
    session_id, _ = env.open_session()
    head = (
        f"GET {events_url(session_id)} HTTP/1.1\r\nHost: gateway\r\n".encode()
        + b"Authorization: Bearer "
        + token
        + b"\r\nConnection: close\r\n\r\n"
    )

    status, headers, body = env.serve(lambda http: raw_request(http, head))

    assert status == 401, body
    assert Answer(status, headers, body).error()["code"] == "unauthorized"


def test_the_gateways_own_refusals_are_problems_too(env: Env) -> None:
    async def scenario(http: Http) -> tuple[Answer, Answer]:
        unknown = await fetch(http, "/v1/nowhere")
        async with http.post(events_url("s-" + "0" * 24)) as response:
            wrong_method = Answer(response.status, dict(response.headers), await response.text())
        return unknown, wrong_method

    unknown, wrong_method = env.serve(scenario)

    assert (unknown.status, unknown.error()["code"]) == (404, "not_found")
    assert (wrong_method.status, wrong_method.error()["code"]) == (405, "method_not_allowed")
    assert wrong_method.headers["Allow"] == "GET,HEAD"


def test_a_ticket_opens_one_stream_only(env: Env) -> None:
    session_id, _ = env.finished_session()
    ticket = env.ticket(session_id)

    async def scenario(http: Http) -> tuple[Answer, Answer]:
        url = events_url(session_id, ticket=ticket)
        return await fetch(http, url), await fetch(http, url)

    first, again = env.serve(scenario)

    assert first.status == 200
    assert again.status == 401
    assert again.error()["code"] == "invalid_ticket"


def test_a_ticket_for_another_session_is_401_and_spent(env: Env) -> None:
    session_id, _ = env.finished_session()
    other_id, _ = env.open_session(user="bob")
    others = env.ticket(other_id)

    async def scenario(http: Http) -> tuple[Answer, Answer]:
        wrong = await fetch(http, events_url(session_id, ticket=others))
        right = await fetch(http, events_url(other_id, ticket=others))
        return wrong, right

    wrong, right = env.serve(scenario)

    assert wrong.status == 401
    assert wrong.error()["code"] == "invalid_ticket"
    assert right.status == 401  # not even on its own session any more


def test_a_bad_ticket_is_401_even_beside_a_good_token(env: Env) -> None:
    session_id, token = env.finished_session()

    answer = get(env, events_url(session_id, ticket="forged"), bearer(token))

    assert answer.status == 401
    assert answer.error()["code"] == "invalid_ticket"


# -- stopping ----------------------------------------------------------------------------------


class _SwallowsTheFirstCancel:
    """A Redis client whose SUBSCRIBE loses one cancellation, as redis-py's write does on
    Python 3.11 (the image's): ``asyncio.wait_for`` returns the result and drops a cancel that
    arrives as the write completes (CPython gh-86296). Then it listens forever."""

    def __init__(self) -> None:
        self.subscribing = asyncio.Event()

    def pubsub(self) -> _SwallowsTheFirstCancel:
        return self

    async def __aenter__(self) -> _SwallowsTheFirstCancel:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        return None

    async def subscribe(self, *_channels: str) -> None:
        self.subscribing.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)

    async def listen(self) -> AsyncIterator[dict[str, Any]]:
        await asyncio.Event().wait()
        yield {}


def test_the_event_hub_stops_even_if_its_first_cancel_is_swallowed() -> None:
    async def scenario() -> bool:
        client = _SwallowsTheFirstCancel()
        hub = EventHub(client)  # type: ignore[arg-type]
        hub.start()
        await asyncio.wait_for(client.subscribing.wait(), READ_SECONDS)
        stopping = asyncio.create_task(hub.stop())
        done, _ = await asyncio.wait({stopping}, timeout=2.0)
        if not done:  # clean up the hung hub for the test's sake
            assert hub._task is not None
            hub._task.cancel()
            await stopping
        return bool(done)

    assert asyncio.run(scenario()), "EventHub.stop() did not return within 2 s"
