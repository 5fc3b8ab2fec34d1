"""Long-lived connections on one gateway process: thousands of idle event streams and hundreds
of open terminals, what each costs in memory, and whether short API requests feel them.

The whole system runs as its own processes (``labvirt sim``, ``api``, ``gateway``, workers,
``beat``) on a private Redis. Sessions are booted first; then, side by side in one run:

1. short requests alone: ``GET /v1/sessions/{id}`` through the gateway (the one origin a
   browser uses) and straight to the API, 8 clients, p50/p99;
2. the same with ``--streams`` event streams and ``--terminals`` terminal websockets open on
   the one gateway process (terminals spread over the sessions' VMs, so several tabs share a
   VM's console as learners' tabs do);
3. the same again after they closed, to see the machine's drift.

Memory per connection is the gateway's resident set after opening them minus before, divided
by their number.

    python -m benchmarks.gateway_bench --streams 2000 --terminals 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from benchmarks.percentiles import percentile
from shared.adapters.redis_server import EmbeddedRedis
from tests.e2e.harness import System, start_system

SESSIONS = 20


async def short_requests(
    http: aiohttp.ClientSession, base: str, sessions: list[dict[str, Any]], count: int
) -> dict[str, float]:
    """``count`` session GETs from 8 concurrent clients: latency p50/p99 and requests/s."""
    latencies: list[float] = []
    queue = list(range(count))

    async def client() -> None:
        while queue:
            i = queue.pop()
            session = sessions[i % len(sessions)]
            started = time.perf_counter()
            async with http.get(
                f"{base}/v1/sessions/{session['id']}",
                headers={"Authorization": f"Bearer {session['token']}"},
            ) as answer:
                await answer.read()
                assert answer.status == 200, answer.status
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(8)))
    elapsed = time.perf_counter() - began
    return {
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "per_second": round(count / elapsed, 1),
    }


async def ticket(http: aiohttp.ClientSession, base: str, session: dict[str, Any]) -> str:
    async with http.post(
        f"{base}/v1/sessions/{session['id']}/tickets",
        headers={"Authorization": f"Bearer {session['token']}"},
    ) as answer:
        assert answer.status == 201, await answer.text()
        return str((await answer.json())["ticket"])


async def measure(system: System, streams: int, terminals: int, requests: int) -> dict[str, Any]:
    gateway = psutil.Process(system.procs["gateway"].process.pid)
    sessions = [system.create("ubuntu", f"bench-{i}") for i in range(SESSIONS)]
    for session in sessions:
        system.wait_state(session["id"], "ready", timeout=120)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        phases: dict[str, Any] = {}
        for base in (system.base_url, system.api_url):  # warm both paths up, unmeasured
            await short_requests(http, base, sessions, 200)
        for target, base in (("gateway", system.base_url), ("api", system.api_url)):
            phases[f"before/{target}"] = await short_requests(http, base, sessions, requests)
        rss_before = gateway.memory_info().rss
        opened_streams = []
        for i in range(streams):
            session = sessions[i % SESSIONS]
            response = await http.get(
                f"{system.base_url}/v1/sessions/{session['id']}/events",
                headers={"Authorization": f"Bearer {session['token']}"},
            )
            assert response.status == 200
            opened_streams.append(response)
        opened_terminals = []
        for i in range(terminals):
            session = sessions[i % SESSIONS]
            url = (
                f"{system.base_url}/v1/sessions/{session['id']}/terminal"
                f"?vm=ubuntu&ticket={await ticket(http, system.base_url, session)}"
            )
            opened_terminals.append(await http.ws_connect(url))
        await asyncio.sleep(2)  # every upstream console connected, every stream idle
        async with http.get(f"{system.base_url}/healthz") as answer:
            health = await answer.json()
        rss_open = gateway.memory_info().rss
        for target, base in (("gateway", system.base_url), ("api", system.api_url)):
            phases[f"open/{target}"] = await short_requests(http, base, sessions, requests)
        # A typed command still comes back through all of this.
        probe = opened_terminals[0]
        started = time.perf_counter()
        await probe.send_bytes(b"hostname\r")
        seen = ""
        while "ubuntu\r\n" not in seen:
            message = await probe.receive(timeout=10)
            seen += message.data.decode(errors="replace")
        echo_ms = (time.perf_counter() - started) * 1000
        for ws in opened_terminals:
            await ws.close()
        for response in opened_streams:
            response.close()
        await asyncio.sleep(2)
        for target, base in (("gateway", system.base_url), ("api", system.api_url)):
            phases[f"after/{target}"] = await short_requests(http, base, sessions, requests)
    connections = streams + terminals
    return {
        "event_streams": health["event_streams"],
        "terminals": health["terminals"],
        "console_upstreams": health["console_upstreams"],
        "gateway_rss_before_mb": round(rss_before / 2**20, 1),
        "gateway_rss_open_mb": round(rss_open / 2**20, 1),
        "kb_per_connection": round((rss_open - rss_before) / connections / 1024, 1),
        "command_echo_ms_with_all_open": round(echo_ms, 1),
        "short_requests": phases,
        "p99_ratio_open_vs_before": {
            target: round(
                phases[f"open/{target}"]["p99_ms"] / phases[f"before/{target}"]["p99_ms"], 2
            )
            for target in ("gateway", "api")
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--terminals", type=int, default=200)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    runs = []
    for _ in range(args.repeats):
        redis_server = EmbeddedRedis().start()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                system = start_system(
                    redis_server.url, Path(tmp), sim_args=["--boot-seconds", "1", "--nodes", "10"]
                )
                try:
                    runs.append(
                        asyncio.run(measure(system, args.streams, args.terminals, args.requests))
                    )
                finally:
                    system.stop()
        finally:
            redis_server.stop()
    medians = {
        "kb_per_connection": statistics.median(r["kb_per_connection"] for r in runs),
        "p99_ratio_open_vs_before": {
            target: statistics.median(r["p99_ratio_open_vs_before"][target] for r in runs)
            for target in ("gateway", "api")
        },
    }
    print(json.dumps({"runs": runs, "medians": medians}, indent=2))
    held = all(
        r["event_streams"] >= args.streams and r["terminals"] >= args.terminals for r in runs
    )
    return 0 if held else 1


if __name__ == "__main__":
    raise SystemExit(main())
