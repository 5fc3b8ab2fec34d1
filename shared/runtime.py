"""What a labvirt process holds once it has started: settings, adapters and built services.

Built once by each process's wiring function (``build_runtime``); nothing here connects at
import time. The API's runtime has no Kubernetes clients (``clusters`` is None); a worker's has
one client per region. Services a worker builds once (the provisioner, the reconciler...) are
kept by ``service``, so every task of the process shares them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

import redis
from celery import Celery

from shared.adapters.connections import ConnectionSweeper
from shared.adapters.dead_letters import DeadLetters
from shared.adapters.pool_store import RedisPoolStore
from shared.adapters.rate_limits import RateLimiter
from shared.adapters.redis_client import sentinel_target, sync_client
from shared.adapters.region_state import RedisRegionState
from shared.adapters.session_events import SessionEvents
from shared.adapters.session_store import RedisSessionStore
from shared.adapters.template_files import load_templates
from shared.config import ConfigError, Settings
from shared.domain.lifecycle import ClockOverrides, DeadlinePolicy, clocks_for
from shared.domain.templates import Template
from shared.jobs import TaskQueue, check_celery, make_celery
from shared.region_readings import READING_SECONDS, ReadingCache
from shared.regions import RegionPicker
from shared.session_life import SessionLife

if TYPE_CHECKING:  # only workers hold Kubernetes clients; the API never imports them
    from shared.adapters.clusters import Clusters

S = TypeVar("S")


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
    # Request rate limits (``settings.limits``); None checks none, as on a Redis without Lua.
    rate_limiter: RateLimiter | None = None
    # One Kubernetes client per region: workers only.
    clusters: Clusters | None = None
    # Push task messages onto the broker's lists with ``redis`` (the broker is that Redis),
    # without Celery's cost per message: the API's creates (``shared.adapters.task_messages``).
    publish_directly: bool = False
    # Keep the regions' counts this long between reads (``shared.region_readings``); 0: never.
    region_reading_seconds: float = 0.0
    # Progress events ride on the same Redis client: nothing to configure.
    events: SessionEvents = field(init=False)
    queue: TaskQueue = field(init=False)
    life: SessionLife = field(init=False)
    # Where new sessions go: regions' liveness, drain flags and load (``shared.regions``).
    regions: RegionPicker = field(init=False)
    dead_letters: DeadLetters = field(init=False)
    _services: dict[type, Any] = field(init=False, default_factory=dict)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.events = SessionEvents(self.redis)
        self.queue = TaskQueue(self.celery, broker=self.redis if self.publish_directly else None)
        self.dead_letters = DeadLetters(
            self.redis,
            retention_seconds=self.settings.dead_letter_retention_seconds,
            max_records=self.settings.dead_letter_max,
            clock=self.clock,
        )
        self.regions = RegionPicker(
            settings=self.settings,
            state=RedisRegionState(self.redis),
            sessions=self.sessions,
            templates=self.templates,
            pools=self.pools,
            readings=(
                ReadingCache(max_age=self.region_reading_seconds)
                if self.region_reading_seconds > 0
                else None
            ),
        )
        self.life = SessionLife(
            store=self.sessions,
            events=self.events,
            queue=self.queue,
            clock=self.clock,
            pools=self.pools,
            connections=ConnectionSweeper(self.redis),
            dead_letters=self.dead_letters,
            max_sessions_per_user=self.settings.max_sessions_per_user,
            regions=self.regions,
        )

    def kube(self) -> Clusters:
        if self.clusters is None:
            raise RuntimeError("this process has no Kubernetes clients (only workers do)")
        return self.clusters

    def service(self, kind: type[S], build: Callable[[Runtime], S]) -> S:
        """The process's one ``kind``, built on first use by ``build`` if wiring did not."""
        with self._lock:
            found = self._services.get(kind)
            if found is None:
                found = self._services[kind] = build(self)
            return cast(S, found)


def build_runtime(
    settings: Settings,
    *,
    celery: Celery | None = None,
    clusters: Clusters | None = None,
    publish_directly: bool = False,
) -> Runtime:
    """The process's runtime; a worker passes its ``Clusters``, the API none (and publishes
    its tasks directly, ``Runtime.publish_directly``)."""
    client = sync_client(
        settings.redis_url,
        socket_connect_timeout=5,
        socket_timeout=10,
        health_check_interval=30,
    )
    return Runtime(
        settings=settings,
        redis=client,
        sessions=RedisSessionStore(
            client,
            policy=deadline_policy(settings),
            # Behind Sentinel there are replicas: a new session waits until one has it.
            replicas_to_wait_for=1 if sentinel_target(settings.redis_url) else 0,
            ended_retention_seconds=settings.ended_retention_seconds,
            scripted=True,
        ),
        templates=load_templates(settings.templates_path),
        celery=celery or make_celery(settings),
        pools=RedisPoolStore(client),
        rate_limiter=RateLimiter(client),
        clusters=clusters,
        publish_directly=publish_directly,
        region_reading_seconds=READING_SECONDS,
    )


def check_startup(settings: Settings, celery: Celery, templates: dict[str, Template]) -> None:
    """Every process runs this at start: Celery's settings and the timeouts must fit together
    (``shared.jobs.check_celery``), and a lost provision must be asked again before its session
    would fail for not starting; a ``ConfigError`` names what to change."""
    celery.loader.import_default_modules()
    overrides = clock_overrides(settings)
    shortest = min(
        (clocks_for(t, overrides).startup_timeout_seconds for t in templates.values()),
        default=float("inf"),
    )
    if not settings.provision_recovery_seconds < shortest:
        raise ConfigError(
            f"LABVIRT_PROVISION_RECOVERY_SECONDS ({settings.provision_recovery_seconds:g}) must "
            f"be below the shortest session startup timeout ({shortest:g} s)"
        )
    check_celery(celery, startup_timeout_seconds=shortest)


def deadline_policy(settings: Settings) -> DeadlinePolicy:
    return DeadlinePolicy(
        expiry_warning_seconds=settings.expiry_warning_seconds,
        teardown_retry_seconds=settings.teardown_retry_seconds,
        provision_retry_seconds=settings.provision_recovery_seconds,
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
    # Where a task that fails for good is recorded (``shared.jobs.labvirt_task``).
    app.labvirt_dead_letters = runtime.dead_letters
