"""Simulator throughput: VMI creates per second and watch fan-out latency, over real HTTP.

Runs `labvirt sim` as its own process and drives it with an aiohttp client from this one, so
the numbers include HTTP parsing, admission, storage and event fan-out as labvirt sees them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

# KubeVirt's schema beside the checkout, when there (../shared/kubevirt).
_DEFAULT_SCHEMA = Path(__file__).resolve().parents[2] / "shared/kubevirt/vmi-schema-strict.json"
VMI_PATH = "/apis/kubevirt.io/v1/namespaces/default/virtualmachineinstances"


def vmi(name: str, *, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": name, "labels": {"bench": "yes", **(labels or {})}},
        "spec": {
            "domain": {
                "devices": {
                    "disks": [{"name": "containerdisk", "disk": {"bus": "virtio"}}],
                    "interfaces": [{"name": "default", "masquerade": {}}],
                },
                "resources": {"requests": {"memory": "64Mi"}},
            },
            "networks": [{"name": "default", "pod": {}}],
            "terminationGracePeriodSeconds": 0,
            "volumes": [
                {
                    "name": "containerdisk",
                    "containerDisk": {"image": "quay.io/containerdisks/ubuntu:22.04"},
                },
            ],
        },
    }


class Simulator:
    def __init__(self, extra: list[str]) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="labvirt-bench-")
        self.kubeconfig = Path(self._tmp.name) / "kubeconfig"
        self._argv = [
            sys.executable,
            "-m",
            "labvirt.cli",
            "sim",
            "--port",
            "0",
            "--kubeconfig",
            str(self.kubeconfig),
            "--seed",
            "1",
            *extra,
        ]
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.startup_seconds = 0.0

    def __enter__(self) -> Simulator:
        started = time.perf_counter()
        self.process = subprocess.Popen(
            self._argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 20
        while not self.kubeconfig.exists():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("simulator did not start")
            time.sleep(0.01)
        self.startup_seconds = time.perf_counter() - started
        config = yaml.safe_load(self.kubeconfig.read_text())
        self.url = config["clusters"][0]["cluster"]["server"]
        return self

    def __exit__(self, *_: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self._tmp.cleanup()


async def creates_per_second(url: str, *, count: int, concurrency: int) -> dict[str, float]:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=connector) as http:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(count):
            queue.put_nowait(i)
        failures = 0

        async def worker() -> None:
            nonlocal failures
            while not queue.empty():
                i = queue.get_nowait()
                async with http.post(VMI_PATH, json=vmi(f"create-{i}")) as response:
                    await response.read()
                    if response.status != 201:
                        failures += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {
        "creates": count,
        "seconds": elapsed,
        "per_second": count / elapsed,
        "failures": failures,
    }


async def watch_fanout(
    url: str, *, watchers: int, events: int, interval: float
) -> dict[str, float]:
    """Latency from just before a create is sent to each watcher's receipt of its ADDED."""
    sent: dict[str, float] = {}
    latencies: list[float] = []
    ready = 0
    all_ready = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=watchers + 8)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as http:
        async with http.get(VMI_PATH, params={"labelSelector": "fanout=yes"}) as response:
            rv = (await response.json())["metadata"]["resourceVersion"]

        async def watcher() -> None:
            nonlocal ready
            params = {
                "watch": "true",
                "labelSelector": "fanout=yes",
                "resourceVersion": rv,
                "timeoutSeconds": "600",
            }
            seen = 0
            async with http.get(VMI_PATH, params=params) as response:
                ready += 1
                if ready == watchers:
                    all_ready.set()
                async for line in response.content:
                    now = time.perf_counter()
                    event = json.loads(line)
                    if event["type"] != "ADDED":
                        continue
                    name = event["object"]["metadata"]["name"]
                    latencies.append(now - sent[name])
                    seen += 1
                    if seen == events:
                        return

        tasks = [asyncio.create_task(watcher()) for _ in range(watchers)]
        await asyncio.wait_for(all_ready.wait(), 30)
        await asyncio.sleep(0.5)  # let every stream reach the server's watcher list
        for i in range(events):
            name = f"fanout-{i}"
            sent[name] = time.perf_counter()
            async with http.post(VMI_PATH, json=vmi(name, labels={"fanout": "yes"})) as resp:
                await resp.read()
            await asyncio.sleep(interval)
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
    latencies.sort()
    return {
        "watchers": watchers,
        "events": events,
        "deliveries": len(latencies),
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "max_ms": latencies[-1] * 1000,
    }


def run(
    *,
    creates: int,
    concurrency: int,
    watchers: int,
    events: int,
    repeats: int,
    schema: Path | None,
) -> dict[str, Any]:
    create_runs = []
    strict_runs = []
    fanout_runs = []
    startups = []
    for _ in range(repeats):
        with Simulator(["--nodes", "200", "--boot-seconds", "5"]) as sim:
            startups.append(sim.startup_seconds)
            create_runs.append(
                asyncio.run(creates_per_second(sim.url, count=creates, concurrency=concurrency))
            )
        if schema is not None:
            strict = ["--nodes", "200", "--boot-seconds", "5", "--vmi-schema", str(schema)]
            with Simulator(strict) as sim:
                strict_runs.append(
                    asyncio.run(creates_per_second(sim.url, count=creates, concurrency=concurrency))
                )
        with Simulator(["--nodes", "50", "--boot-seconds", "5"]) as sim:
            fanout_runs.append(
                asyncio.run(watch_fanout(sim.url, watchers=watchers, events=events, interval=0.02))
            )
    return {
        "startup_seconds_median": statistics.median(startups),
        "startup_seconds_max": max(startups),
        "creates_per_second_median": statistics.median(r["per_second"] for r in create_runs),
        "creates_per_second_strict_schema_median": (
            statistics.median(r["per_second"] for r in strict_runs) if strict_runs else None
        ),
        "creates_runs": create_runs,
        "fanout_p50_ms_median": statistics.median(r["p50_ms"] for r in fanout_runs),
        "fanout_p99_ms_median": statistics.median(r["p99_ms"] for r in fanout_runs),
        "fanout_runs": fanout_runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--creates", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--watchers", type=int, default=100)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--vmi-schema",
        type=Path,
        default=_DEFAULT_SCHEMA,
        help="also measure creates with KubeVirt's strict schema admission (when the file exists)",
    )
    args = parser.parse_args(argv)
    schema = args.vmi_schema if args.vmi_schema and args.vmi_schema.exists() else None
    result = run(
        creates=args.creates,
        concurrency=args.concurrency,
        watchers=args.watchers,
        events=args.events,
        repeats=args.repeats,
        schema=schema,
    )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
