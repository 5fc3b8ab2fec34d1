"""``labvirt api``: the Flask app under gunicorn's threaded worker."""

from __future__ import annotations

from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

from services.api.app import create_app
from shared.config import Settings
from shared.runtime import build_runtime, check_startup


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    def __init__(self, app: Flask, options: dict[str, Any]) -> None:
        self._app = app
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        return self._app


def serve(settings: Settings) -> None:
    runtime = build_runtime(settings)
    check_startup(settings, runtime.celery, runtime.templates)
    app = create_app(runtime)
    _Gunicorn(
        app,
        {
            "bind": f"{settings.api_host}:{settings.api_port}",
            "worker_class": "gthread",
            "workers": 1,
            "threads": settings.api_threads,
            "timeout": 60,
            "graceful_timeout": 10,
            "accesslog": None,
            "errorlog": "-",
            "loglevel": settings.log_level.lower(),
            "proc_name": "labvirt-api",
        },
    ).run()
