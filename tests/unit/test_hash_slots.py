"""Every transaction, script and multi-key command labvirt runs stays in one hash slot, so the
key layout keeps Redis Cluster within reach (``shared.adapters.hash_tags``).

The adapters' main operations (sessions opened cold and warm, read, reaped, disconnected,
closed and finished; pool reservations, claims, retirements and counters; connection leases;
events; dead letters; tickets; region flags; rate limits; idempotency records) run against the
suite's real Redis while a MONITOR connection records what the server executes, Lua scripts'
own calls included. Redis itself names each command's keys (``COMMAND GETKEYS``). Then, per
client connection:

- a command's keys share one slot (what a cluster asks of MGET, DEL k1 k2, ...);
- WATCH ... MULTI ... EXEC: everything watched, read in between and queued shares one slot;
- EVAL/EVALSHA: its KEYS share one slot, and the script touches no key outside its KEYS.

Every script the adapters registered must have run, so a new script is checked as soon as it
is used here. ``test_a_real_cluster_runs_every_operation`` runs the same operations through
``redis.cluster.RedisCluster`` against a three-master cluster of the local ``redis-server``: a
CROSSSLOT error there fails for real.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.crc import key_slot

from shared.adapters.connections import Connections, ConnectionSweeper
from shared.adapters.dead_letters import DeadLetters
from shared.adapters.idempotency import (
    Claimed,
    IdempotencyScope,
    IdempotencyStore,
    StoredResponse,
)
from shared.adapters.pool_store import RedisPoolStore
from shared.adapters.rate_limits import AsyncRateLimiter, RateCheck, RateLimiter, RateScope
from shared.adapters.redis_server import answers, free_port
from shared.adapters.region_state import RedisRegionState
from shared.adapters.session_events import SessionEvents
from shared.adapters.session_store import RedisSessionStore
from shared.adapters.tickets import issue_ticket, redeem_ticket
from shared.config_limits import Rate
from shared.domain.lifecycle import SessionClocks, Stage, start_session
from shared.domain.pools.config import PoolConfig, PoolKey
from shared.domain.pools.environments import new_warm_environment
from shared.domain.sessions import VmView
from shared.jobs import PROVISION, TaskQueue
from shared.session_life import SessionLife
from tests.doubles import RecordingCelery

NOW = 1_700_000_000.0
GRACE = 30.0
CLOCKS = SessionClocks(
    max_lifetime_seconds=3600,
    idle_timeout_seconds=600,
    startup_timeout_seconds=300,
    extend_step_seconds=600,
    hard_deadline_seconds=7200,
)
VMS = (VmView(name="ubuntu", hostname="ubuntu", ip="10.0.0.2", phase="Running", ready=True),)
EU, US = PoolKey("eu", "ubuntu"), PoolKey("us", "kubernetes")
_TRANSACTION_ENDS = frozenset({b"EXEC", b"DISCARD", b"UNWATCH", b"RESET"})
_BUS_OFFSET = 10_000
_SCRIPTS = frozenset({b"EVAL", b"EVALSHA", b"EVAL_RO", b"EVALSHA_RO", b"FCALL", b"FCALL_RO"})


# -- the operations ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@dataclass
class Scripts:
    """The Lua sources the adapters registered, however their client was made."""

    sources: set[str] = field(default_factory=set)

    def shas(self) -> set[str]:
        return {_sha(s.encode()) for s in self.sources}


def recording_scripts(client: Any, scripts: Scripts) -> Any:
    """``client``, with every ``register_script`` noted in ``scripts``."""
    register = client.register_script

    def noted(source: str) -> Any:
        scripts.sources.add(source)
        return register(source)

    client.register_script = noted
    return client


def exercise(client: Any, gateway_client: Any, run: Callable[[Any], Any], scripts: Scripts) -> None:
    """The adapters' main operations, as the API, the gateway and the workers run them.

    ``client`` is what the API and workers use, ``gateway_client`` the gateway's (asyncio,
    driven by ``run``)."""
    client = recording_scripts(client, scripts)
    gateway_client = recording_scripts(gateway_client, scripts)
    clock = FakeClock()
    celery = RecordingCelery()
    pools = RedisPoolStore(client)
    store = RedisSessionStore(client, scripted=True)
    events = SessionEvents(client)
    sweeper = ConnectionSweeper(client)
    letters = DeadLetters(client, max_records=2, clock=clock)
    life = SessionLife(
        store=store,
        events=events,
        queue=TaskQueue(celery),
        clock=clock,
        pools=pools,
        connections=sweeper,
        dead_letters=letters,
    )
    gateway = Connections(gateway_client)

    # A warm pool: configured, filled, booted, one environment given up.
    pools.set_config(EU, PoolConfig(size=3))
    assert pools.config(EU, default=PoolConfig()) == PoolConfig(size=3)
    pools.set_globally_paused(False)
    assert not pools.globally_paused()
    with pools.lock(EU, seconds=10) as held:
        assert held
        reserved = pools.reserve(
            EU,
            [new_warm_environment(key=EU, now=NOW) for _ in range(3)],
            ceiling=3,
            max_in_flight=3,
        )
    assert len(reserved) == 3
    booting, ready, failing = reserved
    pools.mark_unschedulable(booting.id, unschedulable=True)
    assert pools.environment(booting.id) is not None
    assert pools.mark_ready(EU, ready.id, vms=VMS, at=NOW + 30)
    pools.record_success(EU, refill_seconds=30)
    assert pools.retire(EU, failing.id)
    pools.record_failure(EU, at=NOW + 31)
    pools.set_target(EU, 3)
    assert len(pools.snapshot(EU).ready) == 1
    assert pools.held_counts([EU, US]) == {EU: (1, 1), US: (0, 0)}

    # Sessions: one warm (claims the ready environment), one cold that boots.
    warm = life.open(user="alice", template="ubuntu", clocks=CLOCKS, replace=False, region="eu")
    assert warm.session.warm
    cold = life.open(user="bob", template="kubernetes", clocks=CLOCKS, replace=False, region="us")
    assert not cold.session.warm
    assert celery.named(PROVISION)
    assert life.open(
        user="alice", template="ubuntu", clocks=CLOCKS, replace=False, region="eu"
    ).reconnected
    clock.now += 5
    life.record_progress(cold.session.id, list(VMS))
    assert life.mark_ready(cold.session.id, list(VMS))
    life.heartbeat(warm.session.id)
    life.extend(warm.session.id)
    life.emit(warm.session.id, Stage.READY, {"note": "checked"})
    assert events.read(warm.session.id)
    assert events.history(cold.session.id)
    assert [s.id for s in store.user_sessions("alice")] == [warm.session.id]
    assert set(store.region_sessions("eu")) == {warm.session.id}
    assert {s.id for s in store.live_sessions()} == {warm.session.id, cold.session.id}
    assert store.live_counts(["eu", "us"], ["ubuntu", "kubernetes"])["us"].total == 1
    assert store.deadline("idle", cold.session.id) is not None
    assert store.count_deadlines("idle") == 2
    assert [e.id for e in pools.unbound_claims(EU, before=clock.now + 1)] == [ready.id]
    pools.forget_claim(EU, ready.id)
    assert pools.owned_environment_ids("eu") == {booting.id}
    assert pools.restore_environment(
        region="eu", template="ubuntu", environment_id="0123456789", created_at=NOW, ready=True
    )
    pools.counters.totals(EU)
    pools.demand(EU, now=clock.now)
    pools.fold_profile(EU, now=clock.now + 7 * 24 * 3600)

    # The gateway: connections come and go; the warm session's browser goes away for good.
    ticket, _ = issue_ticket(client, warm.session.id, now=clock.now)
    assert run(redeem_ticket(gateway_client, ticket, warm.session.id))
    run(gateway.open(warm.session.id, "events-1", now=clock.now))
    run(gateway.open(cold.session.id, "terminal-1", now=clock.now))
    run(gateway.renew(warm.session.id, ["events-1"], now=clock.now + 10))
    assert run(gateway.close(warm.session.id, "events-1", now=clock.now + 11))
    clock.now += 11 + GRACE
    assert life.close_disconnected(grace=GRACE) == [warm.session.id]
    assert life.finish(warm.session.id)

    # The reaper: the cold session's gateway died (its lease runs out), then idle time ends it.
    clock.now += CLOCKS.idle_timeout_seconds
    assert cold.session.id in life.reap(batch=100).teardowns
    assert life.finish(cold.session.id)
    assert {s.id for s in store.finished_sessions(limit=10)} == {
        warm.session.id,
        cold.session.id,
    }
    rebuilt, _ = start_session(
        user="dave", template="ubuntu", region="eu", clocks=CLOCKS, now=clock.now
    )
    assert life.restore(rebuilt)  # as the reconciler rebuilds one from its VMIs
    store.forget_deadline("idle", rebuilt.id)
    with store.user_lock("carol"):
        pass

    # Dead letters: recorded, trimmed to two, requeued, resolved, purged.
    for n in range(3):
        clock.now += 1
        letters.record(
            task=PROVISION,
            payload={"session_id": f"s-{n}"},
            task_id=f"t-{n}",
            error=RuntimeError("the cluster said no"),
            traceback="",
        )
    kept, _ = letters.list()
    assert len(kept) == 2
    letter, queued = letters.requeue(kept[0].id, by="ops", enqueue=lambda _t, _p: None)
    assert queued
    assert letter is not None
    assert letters.resolved(letter.task, letter.payload)
    assert letters.purge(kept[1].id)

    # Region flags, rate limits, idempotency records.
    regions = RedisRegionState(client)
    regions.heartbeat(["eu", "us"], ttl_seconds=15)
    regions.set_drained("us", True)
    assert regions.drained_regions(["eu", "us"]) == {"us"}
    rate = Rate(count=2, period_seconds=60.0)
    assert RateLimiter(client).check(RateScope.USER, "alice", rate, now=clock.now) is None
    both = [
        RateCheck(RateScope.USER, "carol", rate),
        RateCheck(RateScope.FRONTEND_TOKEN, "f", rate),
    ]
    assert RateLimiter(client).check_all(both, now=clock.now) is None
    limiter = AsyncRateLimiter(gateway_client)
    assert run(limiter.check(RateScope.USER, "bob", rate, now=clock.now)) is None
    idempotency = IdempotencyStore(client, ttl_seconds=60)
    for name, finish in (("k-1", "complete"), ("k-2", "release")):
        scope = IdempotencyScope.derive(credential="frontend", idempotency_key=name)
        claim = idempotency.claim(scope, "fingerprint")
        assert isinstance(claim, Claimed)
        if finish == "complete":
            response = StoredResponse(201, "{}", "application/json", None)
            assert idempotency.complete(scope, claim, response)
        else:
            assert idempotency.release(scope, claim)


# -- what the server ran ----------------------------------------------------------------------

_LINE = re.compile(rb"^[0-9.]+ \[(\d+) ([^\]]*)\] (.*)$", re.DOTALL)
_ESCAPES = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"a": b"\a", b"b": b"\b"}


def monitor_arguments(text: bytes) -> list[bytes]:
    """The arguments of one MONITOR line: quoted, with C-like escapes (Redis's sdscatrepr)."""
    arguments: list[bytes] = []
    i = 0
    while i < len(text):
        if text[i : i + 1] != b'"':
            i += 1
            continue
        value = bytearray()
        i += 1
        while text[i : i + 1] != b'"':
            assert i < len(text), f"an unterminated argument in {text!r}"
            if text[i : i + 1] == b"\\":
                escaped = text[i + 1 : i + 2]
                if escaped == b"x":
                    value += bytes([int(text[i + 2 : i + 4], 16)])
                    i += 4
                    continue
                value += _ESCAPES.get(escaped, escaped)
                i += 2
                continue
            value += text[i : i + 1]
            i += 1
        arguments.append(bytes(value))
        i += 1
    return arguments


class ServerLog:
    """What one Redis database executed while it was watched (MONITOR), in order."""

    def __init__(self, url: str) -> None:
        self._db = str(int(urlparse(url).path.lstrip("/") or 0)).encode()
        self._client = redis.Redis.from_url(url, protocol=2)
        self._monitor = self._client.monitor()
        self._marker = f"end-of-log-{time.monotonic_ns()}".encode()
        self.lines: list[tuple[bytes, list[bytes]]] = []  # (client or b"lua", arguments)
        self._thread = threading.Thread(target=self._read, daemon=True)

    def __enter__(self) -> ServerLog:
        self._monitor.__enter__()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.echo(self._marker)
        self._thread.join(timeout=30)
        self._monitor.__exit__()
        self._client.close()
        assert not self._thread.is_alive(), "the MONITOR log never reached its end"

    def _read(self) -> None:
        while True:
            raw = self._monitor.connection.read_response()
            found = _LINE.match(raw)
            assert found is not None, raw
            db, source, rest = found.groups()
            arguments = monitor_arguments(rest)
            if arguments == [b"ECHO", self._marker] or arguments == [b"echo", self._marker]:
                return
            if source == b"lua" or db == self._db:
                self.lines.append((source, arguments))


class KeysOf:
    """The keys of a command, as Redis itself finds them (COMMAND GETKEYS)."""

    def __init__(self, url: str) -> None:
        self._client = redis.Redis.from_url(url, protocol=2)

    def __call__(self, arguments: list[bytes]) -> list[bytes]:
        if len(arguments) == 1:
            return []  # MULTI, EXEC, UNWATCH, PING: nothing to name a key with
        connection = self._client.connection_pool.get_connection()
        try:
            connection.send_command("COMMAND", "GETKEYS", *arguments)
            try:
                keys = connection.read_response()
            except redis.ResponseError as error:
                if "no key arguments" in str(error) or "Invalid command" in str(error):
                    return []
                raise
            return list(keys)
        finally:
            self._client.connection_pool.release(connection)

    def close(self) -> None:
        self._client.close()


@dataclass
class Operation:
    """One thing a cluster must run on one slot: a command, a transaction or a script."""

    kind: str
    client: bytes
    commands: list[list[bytes]] = field(default_factory=list)
    keys: set[bytes] = field(default_factory=set)
    touched: set[bytes] = field(default_factory=set)  # a script's own calls

    def describe(self) -> str:
        shown = [b" ".join(c[:4]).decode(errors="replace") for c in self.commands[:8]]
        return f"{self.kind} by {self.client.decode()}: {shown}"


def operations_in(lines: list[tuple[bytes, list[bytes]]], keys_of: KeysOf) -> list[Operation]:
    found: list[Operation] = []
    open_transactions: dict[bytes, Operation] = {}
    last_script: Operation | None = None
    for source, arguments in lines:
        name = arguments[0].upper()
        keys = set(keys_of(arguments))
        if source == b"lua":
            assert last_script is not None, arguments
            last_script.commands.append(arguments)
            last_script.touched |= keys
            continue
        transaction = open_transactions.get(source)
        if transaction is None and name in (b"WATCH", b"MULTI"):
            transaction = open_transactions[source] = Operation("transaction", source)
        if name in _SCRIPTS:
            last_script = Operation("script", source, [arguments], keys)
            found.append(last_script)
        if transaction is not None:
            transaction.commands.append(arguments)
            transaction.keys |= keys
            if name in _TRANSACTION_ENDS:
                found.append(open_transactions.pop(source))
        elif keys and name not in _SCRIPTS:
            found.append(Operation("command", source, [arguments], keys))
    return found + list(open_transactions.values())


def cross_slot_problems(operations: list[Operation]) -> list[str]:
    problems = []
    for op in operations:
        slots = {key_slot(k) for k in op.keys | op.touched}
        if len(slots) > 1:
            problems.append(f"keys of {len(slots)} slots ({sorted(op.keys | op.touched)}): ")
            problems[-1] += op.describe()
        if op.touched - op.keys:
            problems.append(f"a script touches keys not in KEYS {sorted(op.touched - op.keys)}: ")
            problems[-1] += op.describe()
    return problems


def ran_shas(operations: list[Operation]) -> set[str]:
    shas = set()
    for op in operations:
        if op.kind == "script":
            name, body = op.commands[0][0].upper(), op.commands[0][1]
            shas.add(body.decode() if name.startswith(b"EVALSHA") else _sha(body))
    return shas


def _sha(source: bytes) -> str:
    return hashlib.sha1(source).hexdigest()  # Redis names scripts by SHA-1


# -- the tests --------------------------------------------------------------------------------


class Loop:
    """One event loop for the gateway's client."""

    def __init__(self) -> None:
        self._runner = asyncio.Runner()

    def run(self, coroutine: Any) -> Any:
        return self._runner.run(coroutine)

    def close(self) -> None:
        self._runner.close()


@pytest.fixture
def loop() -> Iterator[Loop]:
    made = Loop()
    yield made
    made.close()


@pytest.fixture
def keys_of(redis_url: str) -> Iterator[KeysOf]:
    made = KeysOf(redis_url)
    yield made
    made.close()


def test_every_operation_keeps_to_one_hash_slot(
    redis_url: str, connect: Callable[[], redis.Redis], loop: Loop, keys_of: KeysOf
) -> None:
    scripts = Scripts()
    gateway_client = redis.asyncio.Redis.from_url(redis_url)
    try:
        with ServerLog(redis_url) as log:
            exercise(connect(), gateway_client, loop.run, scripts)
    finally:
        loop.run(gateway_client.aclose())
    operations = operations_in(log.lines, keys_of)

    assert cross_slot_problems(operations) == []
    # Not vacuous: what was recorded is what the operations are made of.
    kinds = {op.kind for op in operations}
    assert kinds == {"command", "transaction", "script"}
    assert scripts.shas() <= ran_shas(operations), "a registered script never ran here"
    assert len(scripts.sources) >= 10


def test_the_check_finds_cross_slot_transactions_scripts_and_commands(
    redis_url: str, connect: Callable[[], redis.Redis], keys_of: KeysOf
) -> None:
    client = connect()
    builds_its_key = "redis.call('SET', ARGV[1], '1'); return redis.call('GET', KEYS[1])"
    with ServerLog(redis_url) as log:
        with client.pipeline(transaction=True) as pipe:
            pipe.set("{a}:one", "1")
            pipe.set("{b}:two", "2")
            pipe.execute()
        client.register_script(builds_its_key)(keys=["{a}:one"], args=["{b}:made-up"])
        client.mget(["{a}:one", "{b}:two"])
        client.mget(["{a}:one", "{a}:three"])  # one slot: fine

    problems = cross_slot_problems(operations_in(log.lines, keys_of))

    assert len(problems) == 4, problems
    assert sum(p.startswith("a script touches keys not in KEYS") for p in problems) == 1
    assert sum("transaction by" in p for p in problems) == 1
    assert sum("command by" in p for p in problems) == 1
    assert sum("script by" in p for p in problems) == 2  # two slots, and a key not in KEYS


def test_monitor_lines_are_read_back_exactly() -> None:
    line = rb'"ZADD" "k" "1.5" "s-1 events-1" "a\"b\\c" "\x00\xff\n"'
    assert monitor_arguments(line) == [
        b"ZADD",
        b"k",
        b"1.5",
        b"s-1 events-1",
        b'a"b\\c',
        b"\x00\xff\n",
    ]


# -- a real cluster ---------------------------------------------------------------------------


class LocalCluster:
    """Three masters of the machine's redis-server, on free loopback ports, saving nothing."""

    def __init__(self, binary: str, cli: str) -> None:
        self._binary, self._cli = binary, cli
        self._tmp = tempfile.TemporaryDirectory(prefix="labvirt-cluster-")
        self.ports: list[int] = []
        while len(self.ports) < 3:
            port = free_port()
            # Each node also listens on its cluster bus, port + 10000.
            if port + _BUS_OFFSET < 65536 and _free(port + _BUS_OFFSET) and port not in self.ports:
                self.ports.append(port)
        self._processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> LocalCluster:
        for port in self.ports:
            workdir = Path(self._tmp.name) / str(port)
            workdir.mkdir()
            argv = [self._binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
            argv += ["--appendonly", "no", "--dir", str(workdir), "--cluster-enabled", "yes"]
            argv += ["--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000"]
            self._processes.append(
                subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        deadline = time.monotonic() + 10
        while not all(answers(f"redis://127.0.0.1:{p}/0") for p in self.ports):
            exited = [p.args for p in self._processes if p.poll() is not None]
            assert not exited, f"a cluster node exited: {exited}"
            assert time.monotonic() < deadline, "cluster nodes did not start"
            time.sleep(0.05)
        nodes = [f"127.0.0.1:{p}" for p in self.ports]
        subprocess.run(
            [self._cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 20
        probe = redis.Redis(port=self.ports[0])
        while probe.cluster("info").get("cluster_state") != "ok":
            assert time.monotonic() < deadline, "the cluster did not become ok"
            time.sleep(0.1)
        probe.close()
        return self

    def stop(self) -> None:
        for process in self._processes:
            process.terminate()
        for process in self._processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._tmp.cleanup()


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if binary is None or cli is None:
        pytest.skip("a real cluster needs the machine's redis-server and redis-cli")
    made = LocalCluster(binary, cli)
    try:
        yield made.start()
    finally:
        made.stop()


def test_a_real_cluster_runs_every_operation(cluster: LocalCluster, loop: Loop) -> None:
    client = redis.cluster.RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    gateway_client = redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=cluster.ports[1])
    scripts = Scripts()
    try:
        exercise(client, gateway_client, loop.run, scripts)
    finally:
        client.close()
        loop.run(gateway_client.aclose())
