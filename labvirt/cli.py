"""``labvirt``: one command for every process of the system.

    labvirt api       the HTTP API (gunicorn)
    labvirt gateway   event streams, terminals and the learner page (asyncio)
    labvirt worker    a Celery worker: provisioning, teardown, maintenance
    labvirt beat      the Celery beat scheduler (reaper, reconciler and prewarmer ticks)
    labvirt sim       the KubeVirt simulator
    labvirt dev       all of the above on one machine, for a newcomer
    labvirt ops       an operator's commands: failed tasks, sessions, pools, drains

Every service reads its configuration from the environment (see README).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Any

from shared.config import ConfigError, Settings


def _settings(process: str) -> Settings:
    from shared.logging import configure_logging  # noqa: PLC0415 - keep `--help` fast

    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"labvirt {process}: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    configure_logging(settings, process=process)
    return settings


def run_api(_: argparse.Namespace) -> int:
    settings = _settings("api")

    def start() -> None:
        _metrics_shared_by_processes(settings, "api")  # before any metric is imported
        from services.api.server import serve  # noqa: PLC0415

        serve(settings)

    return _refusing_bad_config("api", start)


def run_gateway(_: argparse.Namespace) -> int:
    from services.gateway.app import serve  # noqa: PLC0415

    serve(_settings("gateway"))
    return 0


def run_worker(args: argparse.Namespace) -> int:
    settings = _settings("worker")
    name = f"labvirt-{os.getpid()}@{socket.gethostname()}"

    def start() -> None:
        _metrics_shared_by_processes(settings, "worker")  # before any metric is imported
        from labvirt.celery_process import start_worker  # noqa: PLC0415

        start_worker(settings, queues=args.queues, name=name)

    return _refusing_bad_config("worker", start)


def run_beat(_: argparse.Namespace) -> int:
    from labvirt.celery_process import start_beat  # noqa: PLC0415

    settings = _settings("beat")
    return _refusing_bad_config("beat", lambda: start_beat(settings))


def run_sim(sim_argv: list[str]) -> int:
    from labvirt.sim.app import main as sim_main  # noqa: PLC0415

    return sim_main(sim_argv)


def run_dev(args: argparse.Namespace) -> int:
    from labvirt.dev import main as dev_main  # noqa: PLC0415

    return dev_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="labvirt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("api", help="serve the HTTP API").set_defaults(run=run_api)
    commands.add_parser(
        "gateway", help="serve event streams, terminals and the learner page"
    ).set_defaults(run=run_gateway)
    worker = commands.add_parser("worker", help="run a Celery worker")
    worker.add_argument(
        "--queues", default=None, help="comma-separated queues (default: all of labvirt's)"
    )
    worker.set_defaults(run=run_worker)
    commands.add_parser("beat", help="run the Celery beat scheduler").set_defaults(run=run_beat)
    # Listed for `labvirt --help` only: `main` hands `labvirt sim ...` to the simulator's parser.
    commands.add_parser("sim", help="run the KubeVirt simulator (labvirt sim --help)")
    commands.add_parser("ops", help="operate a running labvirt (labvirt ops --help)")
    dev = commands.add_parser("dev", help="run the whole system locally")
    dev.add_argument(
        "--sim-boot-seconds",
        type=float,
        default=8.0,
        help="median VM boot time of the simulator (default 8)",
    )
    dev.add_argument("--run-dir", default=".run", help="where dev keeps its files (default .run)")
    dev.set_defaults(run=run_dev)
    return parser


def _metrics_shared_by_processes(settings: Settings, process: str) -> None:
    """prometheus_client's multiprocess mode, in a fresh directory of this process group."""
    from shared.metrics.multiprocess import enable_multiprocess  # noqa: PLC0415

    enable_multiprocess(settings.metrics_dir, process=process)


def _refusing_bad_config(process: str, start: Any) -> int:
    """Run a process's start-up; a configuration it refuses ends it with the reason (exit 2)."""
    try:
        start()
    except ConfigError as exc:
        print(f"labvirt {process}: configuration error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sim"]:
        # Before argparse, which would take the simulator's options (and --help) for ours.
        return run_sim(argv[1:])
    if argv[:1] == ["ops"]:
        from labvirt.ops import main as ops_main  # noqa: PLC0415

        return ops_main(argv[1:])
    args = build_parser().parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
