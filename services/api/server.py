"""``labvirt api``: the Flask app under gunicorn's threaded workers, one process per CPU.

Each worker process builds its own runtime (Redis and broker connections, the app) after the
fork, so no socket is ever shared between processes; everything the processes must agree on
(sessions, pools, rate limits, idempotency records) is in Redis already.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

from services.api.app import create_app
from shared.adapters.template_files import load_templates
from shared.config import Settings
from shared.jobs import make_celery
from shared.metrics.multiprocess import mark_process_dead
from shared.runtime import build_runtime, check_startup


class GunicornApplication(BaseApplication):  # type: ignore[misc]
    """gunicorn run from Python: the options as given, the WSGI app built by ``build`` in each
    worker process (gunicorn calls ``load`` after forking it)."""

    def __init__(self, build: Callable[[], Any], options: dict[str, Any]) -> None:
        self._build = build
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return self._build()


def gunicorn_options(
    *, bind: str, workers: int, threads: int, log_level: str, proc_name: str
) -> dict[str, Any]:
    """The API's gunicorn settings (the warm-claim benchmark serves its baseline with them)."""
    return {
        "bind": bind,
        "worker_class": "gthread",
        "workers": workers,
        "threads": threads,
        "timeout": 60,
        "graceful_timeout": 10,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": log_level.lower(),
        "proc_name": proc_name,
    }


def serve(settings: Settings) -> None:
    # Checked here, before any worker starts: a configuration refused stops the API once.
    check_startup(settings, make_celery(settings), load_templates(settings.templates_path))

    def build() -> Flask:
        return create_app(build_runtime(settings, publish_directly=True))

    options = gunicorn_options(
        bind=f"{settings.api_host}:{settings.api_port}",
        workers=settings.api_workers,
        threads=settings.api_threads,
        log_level=settings.log_level,
        proc_name="labvirt-api",
    )
    # The workers share their metrics through files (``labvirt api`` set the directory): a
    # worker that exits is marked dead there, so its live gauges stop counting.
    options["child_exit"] = _child_exit
    GunicornApplication(build, options).run()


def _child_exit(_server: Any, worker: Any) -> None:
    mark_process_dead(worker.pid)
