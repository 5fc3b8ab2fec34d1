"""``labvirt sim``: run the KubeVirt simulator as an HTTP server.

The kubeconfig is written only once the socket listens, atomically, so a caller can start the
process and wait for the file. SIGTERM and SIGINT close every watch stream and exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from labvirt.sim.boot import SimulationConfig
from labvirt.sim.clock import AsyncioScheduler, Scheduler
from labvirt.sim.controllers import KubeVirt
from labvirt.sim.core import Core
from labvirt.sim.faults import Faults
from labvirt.sim.kubeconfig import write_kubeconfig
from labvirt.sim.server import ApiServer
from labvirt.sim.store import Store
from labvirt.sim.watch import WatchSettings

log = logging.getLogger("labvirt.sim")


@dataclass(frozen=True)
class Settings:
    """Everything ``labvirt sim`` is told; the KubeVirt part goes to ``SimulationConfig``."""

    host: str = "127.0.0.1"
    port: int = 0
    kubeconfig: Path | None = None
    boot_seconds: float = 8.0
    emulation: bool = False
    nodes: int = 3
    node_cpu: int = 16
    node_memory: str = "64Gi"
    error_rate: float = 0.0
    boot_failure_rate: float = 0.0
    latency_ms: float = 0.0
    watch_drop_rate: float = 0.0
    seed: int | None = None
    vmi_schema: Path | None = None
    history_seconds: float = 75.0
    history_max_events: int = 100_000
    time_scale: float = 1.0
    bookmark_seconds: float = 60.0
    max_grace_seconds: float = 30.0


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="labvirt sim",
        description="A KubeVirt simulator that kubectl and the Kubernetes clients can talk to.",
    )
    add = parser.add_argument
    add("--port", type=int, required=True, help="port to listen on; 0 picks a free one")
    add(
        "--kubeconfig", type=Path, required=True, help="kubeconfig to write once the server listens"
    )
    add("--host", default="127.0.0.1")
    add("--boot-seconds", type=_positive, default=8.0, help="median time from creation to Running")
    add("--emulation", action="store_true", help="software emulation: boots several times slower")
    add("--nodes", type=int, default=3)
    add("--node-cpu", type=int, default=16)
    add("--node-memory", default="64Gi")
    add(
        "--error-rate",
        type=_rate,
        default=0.0,
        help="fraction of API requests answered 429/500/503 (or a dropped watch)",
    )
    add("--boot-failure-rate", type=_rate, default=0.0)
    add("--latency-ms", type=_non_negative, default=0.0, help="delay added to each request")
    add(
        "--watch-drop-rate",
        type=_rate,
        default=0.0,
        help="chance that a watch stream is cut after a short time",
    )
    add("--seed", type=int, default=None)
    add(
        "--vmi-schema",
        type=Path,
        default=None,
        help="JSON Schema that VMI creates are validated against",
    )
    add(
        "--history-seconds",
        type=_non_negative,
        default=75.0,
        help="how far back watches may resume before 410 Expired",
    )
    add("--history-max-events", type=int, default=100_000)
    add(
        "--time-scale",
        type=_positive,
        default=1.0,
        help="multiplies every simulated duration (0.01: a hundred times faster)",
    )
    add(
        "--bookmark-seconds", type=_positive, default=60.0, help="interval of watch BOOKMARK events"
    )
    add("--max-grace-seconds", type=_non_negative, default=30.0)
    add("--log-level", default="INFO")
    return parser


def parse_settings(argv: list[str]) -> tuple[Settings, str]:
    args = build_parser().parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)}
    return Settings(**values), args.log_level


@dataclass
class Simulator:
    """The wired simulator: storage, built-in types, KubeVirt controllers, HTTP handlers."""

    store: Store
    core: Core
    api: ApiServer
    kubevirt: KubeVirt | None = None


def _kubevirt(store: Store, scheduler: Scheduler, settings: Settings) -> KubeVirt:
    config = SimulationConfig(
        boot_seconds=settings.boot_seconds,
        emulation=settings.emulation,
        nodes=settings.nodes,
        node_cpu=settings.node_cpu,
        node_memory=settings.node_memory,
        boot_failure_rate=settings.boot_failure_rate,
        seed=settings.seed,
        time_scale=settings.time_scale,
        vmi_schema_path=settings.vmi_schema,
        max_grace_seconds=settings.max_grace_seconds,
    )
    return KubeVirt(store, scheduler, config)


def build_simulator(
    settings: Settings,
    scheduler: Scheduler,
    *,
    with_kubevirt: bool = True,
    setup: Callable[[Store], None] | None = None,
) -> Simulator:
    """Wire everything; ``setup`` may register more types (tests register stand-ins)."""
    store = Store(
        scheduler,
        history_seconds=settings.history_seconds,
        history_max_events=settings.history_max_events,
        seed=settings.seed,
    )
    core = Core(store, seed=settings.seed)
    controllers = _kubevirt(store, scheduler, settings) if with_kubevirt else None
    if setup is not None:
        setup(store)
    faults = Faults(
        error_rate=settings.error_rate,
        latency_ms=settings.latency_ms,
        watch_drop_rate=settings.watch_drop_rate,
        boot_failure_rate=settings.boot_failure_rate,
    )
    api = ApiServer(
        store,
        core=core,
        controllers=controllers,
        faults=faults,
        watch=WatchSettings(bookmark_seconds=settings.bookmark_seconds),
        seed=settings.seed,
    )
    return Simulator(store=store, core=core, api=api, kubevirt=controllers)


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve(
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    handle_signals: bool = True,
    with_kubevirt: bool = True,
    setup: Callable[[Store], None] | None = None,
    on_ready: Callable[[str, Simulator], None] | None = None,
) -> None:
    """Serve until ``stop`` is set (or SIGTERM/SIGINT, when ``handle_signals``)."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    simulator = build_simulator(
        settings, AsyncioScheduler(loop), with_kubevirt=with_kubevirt, setup=setup
    )
    if handle_signals:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(
        simulator.api.make_app(), access_log=None, handler_cancellation=True, shutdown_timeout=5
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port, backlog=1024)
        await site.start()
        port = int(runner.addresses[0][1])
        url = _url(settings.host, port)
        if settings.kubeconfig is not None:
            write_kubeconfig(settings.kubeconfig, url)
        log.info("simulator listening on %s", url)
        if on_ready is not None:
            on_ready(url, simulator)
        await stop.wait()
        log.info("simulator stopping")
        simulator.api.close_watches()
    finally:
        await runner.cleanup()
        if handle_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)


def main(argv: list[str] | None = None) -> int:
    settings, level = parse_settings(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format="%(message)s",
    )
    try:
        asyncio.run(serve(settings))
    except (OSError, ValueError) as exc:  # a busy port, an invalid simulation config
        log.error("simulator failed: %s", exc)  # the message is the story, not a traceback
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
