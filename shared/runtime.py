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

from shared.adapters.pool_store import RedisPoolStore
from shared.adapters.session_events import SessionEvents
from shared.adapters.session_store import RedisSessionStore
from shared.adapters.template_files import load_templates
from shared.config import Settings
from shared.domain.lifecycle import ClockOverrides, DeadlinePolicy
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
    # Warm pools; None runs without them (every create goes cold), as on a Redis without Lua.
    pools: RedisPoolStore | None = None
    # Progress events ride on the same Redis client: nothing to configure.
    events: SessionEvents = field(init=False)

    def __post_init__(self) -> None:
        self.events = SessionEvents(self.redis)


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
        sessions=RedisSessionStore(client, policy=deadline_policy(settings)),
        templates=load_templates(settings.templates_path),
        celery=celery or make_celery(settings),
        pools=RedisPoolStore(client),
    )


def deadline_policy(settings: Settings) -> DeadlinePolicy:
    return DeadlinePolicy(
        expiry_warning_seconds=settings.expiry_warning_seconds,
        teardown_retry_seconds=settings.teardown_retry_seconds,
    )


def clock_overrides(settings: Settings) -> ClockOverrides:
    return ClockOverrides(
        max_lifetime_seconds=settings.max_lifetime_seconds,
        idle_timeout_seconds=settings.idle_timeout_seconds,
        startup_timeout_seconds=settings.startup_timeout_seconds,
        extend_step_seconds=settings.extend_step_seconds,
        hard_deadline_seconds=settings.hard_deadline_seconds,
    )


def runtime_of(app: Celery) -> Runtime:
    """The runtime ``labvirt worker``/``beat`` attached to their Celery app at start-up."""
    runtime = getattr(app, "labvirt_runtime", None)
    if runtime is None:
        raise RuntimeError("this Celery app was not started by labvirt (no runtime attached)")
    return cast(Runtime, runtime)


def attach_runtime(app: Celery, runtime: Runtime) -> None:
    app.labvirt_runtime = runtime
