"""Where ``POST /v1/sessions`` spends its time: a cProfile of the API's create, in-process.

The API's Flask app and runtime, built as ``labvirt api`` builds them
(``services/api/server.py``), answer N cold creates (``ubuntu``, a learner each) through
Flask's test client, on a private redis-server; nothing boots. The report gives the time per
create, the Redis round trips per create (calls of redis-py's ``call_with_retry``: one per
command or pipeline) and the commands Redis processed per create, and the costliest of
labvirt's own functions, cumulative, per create. Profiling slows Python code down, so the
figures are relative: the share of each part, not its time in the real process.

    python -m benchmarks.api_create_profile [--creates 300]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import pstats
import time
from pathlib import Path
from typing import Any

import redis
import structlog

from services.api.app import create_app
from shared.adapters.redis_server import EmbeddedRedis
from shared.config import Settings
from shared.runtime import build_runtime
from tests.e2e.harness import ADMIN_TOKEN, E2E_RATE_LIMITS, FRONTEND_TOKEN

ROOT = Path(__file__).resolve().parents[1]
WARM_UP = 20
TOP = 15


def _commands_processed(client: redis.Redis) -> int:
    return int(client.info("stats")["total_commands_processed"])


def profile(creates: int, *, top: int = TOP) -> dict[str, Any]:
    # The app's log lines would flood the report and cost the same whatever is profiled.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    server = EmbeddedRedis().start()
    client = redis.Redis.from_url(server.url)
    try:
        settings = Settings.from_env(
            {
                "REDIS_URL": server.url,
                "LABVIRT_MODE": "production",
                "LABVIRT_FRONTEND_TOKENS": FRONTEND_TOKEN,
                "LABVIRT_ADMIN_TOKENS": ADMIN_TOKEN,
                "LABVIRT_METRICS_PORT": "0",
                "LABVIRT_REGION_MAX_LIVE_SESSIONS": str(10 * (creates + WARM_UP)),
                "LABVIRT_REGION_MAX_BOOTING": str(10 * (creates + WARM_UP)),
                **E2E_RATE_LIMITS,
            }
        )
        api = create_app(build_runtime(settings, publish_directly=True)).test_client()
        headers = {"Authorization": f"Bearer {FRONTEND_TOKEN}"}

        def create(user: str) -> None:
            response = api.post(
                "/v1/sessions", json={"template": "ubuntu", "user": user}, headers=headers
            )
            if response.status_code != 201:
                raise AssertionError(f"create answered {response.status_code}: {response.text}")

        for i in range(WARM_UP):
            create(f"warm-up-{i}")
        commands = _commands_processed(client)
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.enable()
        for i in range(creates):
            create(f"learner-{i}")
        profiler.disable()
        elapsed = time.perf_counter() - started
        commands = _commands_processed(client) - commands - 1  # this INFO itself
    finally:
        client.close()
        server.stop()
    stats: dict[tuple[str, int, str], tuple[Any, ...]] = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    own: list[tuple[float, float, str]] = []
    round_trips = 0.0
    for (path, line, function), (_, calls, _, cumulative, _) in stats.items():
        if path.endswith("redis/retry.py") and function == "call_with_retry":
            round_trips += calls
        relative = Path(path).resolve()
        if relative.is_relative_to(ROOT / "services") or relative.is_relative_to(ROOT / "shared"):
            name = f"{relative.relative_to(ROOT)}:{line}({function})"
            own.append((cumulative, calls, name))
    own.sort(reverse=True)
    return {
        "creates": creates,
        "ms_per_create_profiled": round(elapsed / creates * 1000, 2),
        "redis_round_trips_per_create": round(round_trips / creates, 1),
        "redis_commands_per_create": round(commands / creates, 1),
        "costliest": [
            {
                "function": name,
                "ms_per_create": round(cumulative / creates * 1000, 2),
                "calls_per_create": round(calls / creates, 1),
            }
            for cumulative, calls, name in own[:top]
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--creates", type=int, default=300)
    args = parser.parse_args(argv)
    print(json.dumps(profile(args.creates), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
