"""What a labvirt process holds once it has started: settings and its adapters.

Built once by each process's wiring function; nothing here connects at import time. The API's
runtime has no Kubernetes clients at all; workers extend it (``shared.worker_runtime``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import redis
from celery import Celery

from shared.adapters.session_store import RedisSessionStore
from shared.adapters.template_files import load_templates
from shared.config import Settings
from shared.domain.templates import Template
from shared.jobs import make_celery


@dataclass(kw_only=True)
class Runtime:
    settings: Settings
    redis: redis.Redis
    sessions: RedisSessionStore
    templates: dict[str, Template]
    celery: Celery
    clock: Callable[[], float] = field(default=time.time)


def build_runtime(settings: Settings, *, celery: Celery | None = None) -> Runtime:
    client = redis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=5,
        socket_timeout=10,
        health_check_interval=30,
    )
    return Runtime(
        settings=settings,
        redis=client,
        sessions=RedisSessionStore(client),
        templates=load_templates(settings.templates_path),
        celery=celery or make_celery(settings),
    )


def runtime_of(app: Celery) -> Runtime:
    """The runtime ``labvirt worker``/``beat`` attached to their Celery app at start-up."""
    runtime = getattr(app, "labvirt_runtime", None)
    if runtime is None:
        raise RuntimeError("this Celery app was not started by labvirt (no runtime attached)")
    return cast(Runtime, runtime)


def attach_runtime(app: Celery, runtime: Runtime) -> None:
    app.labvirt_runtime = runtime
