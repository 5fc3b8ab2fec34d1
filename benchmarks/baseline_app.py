"""The floor a warm claim is measured against: a bare Flask app whose one route does one Redis
``INCR``, served by gunicorn with the API's own settings (``services.api.server``).

Nothing of labvirt runs in it: no validation, no logging, no broker. Whatever the API spends
above this is labvirt's work; this much no Flask + Redis service on the same machine avoids.

    python -m benchmarks.baseline_app --redis-url URL --port N --workers W --threads T
"""

from __future__ import annotations

import argparse

import redis
from flask import Flask, Response, jsonify

from services.api.server import GunicornApplication, gunicorn_options

COUNTER_KEY = "bench:baseline"


def create_baseline_app(redis_url: str) -> Flask:
    app = Flask("labvirt.baseline", static_folder=None)
    client = redis.Redis.from_url(redis_url)

    @app.post("/incr")
    def increment() -> tuple[Response, int]:
        return jsonify({"count": client.incr(COUNTER_KEY)}), 201

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "ok"})

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args(argv)
    options = gunicorn_options(
        bind=f"{args.host}:{args.port}",
        workers=args.workers,
        threads=args.threads,
        log_level="WARNING",
        proc_name="labvirt-baseline",
    )
    # Built in each worker after the fork, as the API is.
    GunicornApplication(lambda: create_baseline_app(args.redis_url), options).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
