"""``labvirt api``: the Flask app under gunicorn's threaded worker."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

from services.api.app import create_app
from services.api.events import STOPPING_KEY
from shared.config import Settings
from shared.runtime import build_runtime


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
    app = create_app(build_runtime(settings))
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
            "post_worker_init": _end_streams_on_stop(app.extensions[STOPPING_KEY]),
        },
    ).run()


def _end_streams_on_stop(stopping: threading.Event) -> Callable[[Any], None]:
    """A gunicorn hook: the worker's stop signals also end open event streams.

    gthread waits for in-flight requests before it exits; an event stream would keep it
    waiting until the graceful timeout. Chained in front of gunicorn's own handlers.
    """

    def post_worker_init(_worker: Any) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            previous = signal.getsignal(signum)

            def handler(received: int, frame: FrameType | None, previous: Any = previous) -> None:
                stopping.set()
                if callable(previous):
                    previous(received, frame)

            signal.signal(signum, handler)

    return post_worker_init
