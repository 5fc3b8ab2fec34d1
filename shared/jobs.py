"""The contract between services: task names, their payloads, queues and the Celery app.

Services enqueue by task name and a typed payload (``enqueue(name, payload)``), never by
importing each other's modules. Each payload is a ``TypedDict`` of plain ids, checked when it is
sent and again when a worker receives it (``check_payload``), so a malformed message fails
loudly at either end instead of deep inside a task. Queues are chosen by ``task_routes`` alone.
"""

from __future__ import annotations

import functools
import traceback
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, Final, TypedDict

import redis
import structlog
from celery import Celery, Task, shared_task
from kombu.entity import Queue

from shared.adapters.broker_channels import guard_closed_broker_channels
from shared.adapters.dead_letters import DeadLetters
from shared.adapters.redis_client import celery_broker
from shared.adapters.retrying import DEFAULT_TASK_BUDGET, retry_budget
from shared.adapters.task_messages import broker_message
from shared.config import ConfigError, Settings

log = structlog.get_logger(__name__)

PROVISION = "labvirt.provision"
TEARDOWN = "labvirt.teardown"
REAP = "labvirt.reap"
RECONCILE = "labvirt.reconcile"
# Warm pools: beat's tick, booting and retiring pooled environments, binding a claimed one.
PREWARM = "labvirt.prewarm"
PREWARM_ENVIRONMENT = "labvirt.prewarm_environment"
RETIRE_ENVIRONMENT = "labvirt.retire_environment"
BIND_ENVIRONMENT = "labvirt.bind_environment"
# A pooled environment whose VMs wait for node room: give it up if they still wait.
CHECK_ENVIRONMENT = "labvirt.check_environment"

# User-facing work has its own queue so it never waits behind maintenance.
PROVISION_QUEUE = "provision"
TEARDOWN_QUEUE = "teardown"
MAINTENANCE_QUEUE = "maintenance"
QUEUES = (PROVISION_QUEUE, TEARDOWN_QUEUE, MAINTENANCE_QUEUE)
# Booting pool environments: consumed by its own worker (`labvirt worker --queues prewarm`),
# never by the default one, so prewarming can never hold the threads learners wait for.
PREWARM_QUEUE = "prewarm"


class SessionJob(TypedDict):
    """Work on one session's environment (provision, teardown, bind)."""

    session_id: str


class PoolEnvironmentJob(TypedDict):
    """Work on one pooled environment that its pool record describes (boot, check)."""

    environment_id: str


class RetireJob(TypedDict):
    """Delete one pooled environment, whose pool record may already be gone."""

    environment_id: str
    region: str


class TickJob(TypedDict):
    """A periodic pass (reaper, reconciler, prewarmer): nothing to say."""


PAYLOADS: Final[Mapping[str, type]] = {
    PROVISION: SessionJob,
    TEARDOWN: SessionJob,
    BIND_ENVIRONMENT: SessionJob,
    PREWARM_ENVIRONMENT: PoolEnvironmentJob,
    CHECK_ENVIRONMENT: PoolEnvironmentJob,
    RETIRE_ENVIRONMENT: RetireJob,
    REAP: TickJob,
    RECONCILE: TickJob,
    PREWARM: TickJob,
}


class InvalidPayload(ValueError):
    """A task message that does not match its task's payload."""


def check_payload(name: str, payload: Mapping[str, Any]) -> dict[str, str]:
    """``payload`` as the task ``name`` takes it: exactly its keys, each a non-empty string."""
    shape = PAYLOADS.get(name)
    if shape is None:
        raise InvalidPayload(f"no task is named {name!r}")
    wanted = set(shape.__annotations__)
    given = set(payload)
    if given != wanted:
        missing = ", ".join(sorted(wanted - given)) or "none"
        extra = ", ".join(sorted(given - wanted)) or "none"
        raise InvalidPayload(f"{name}: payload keys missing: {missing}; unexpected: {extra}")
    for key, value in payload.items():
        if not isinstance(value, str) or not value:
            raise InvalidPayload(f"{name}: {key} must be a non-empty string, not {value!r}")
    return dict(payload)


class TaskQueue:
    """Where services hand work to workers: ``enqueue(name, payload)``."""

    def __init__(self, celery: Celery, *, broker: redis.Redis | None = None) -> None:
        """``broker``: a client of the Redis the broker is (``REDIS_URL``): a task without a
        delay is then pushed onto its queue's list by it, the message Celery would publish
        without Celery's cost per message (``task_messages``)."""
        self._celery = celery
        self._broker = broker

    def enqueue(self, name: str, payload: Mapping[str, Any], *, delay: float | None = None) -> None:
        """Publish the task; its queue comes from ``task_routes``. ``delay`` in seconds."""
        checked = check_payload(name, payload)
        queue = self._queue_of(name) if self._broker is not None and delay is None else None
        if self._broker is None or queue is None:
            self._celery.send_task(name, kwargs=checked, countdown=delay)
            return
        self._broker.lpush(queue, broker_message(self._celery, name, checked, queue=queue))

    def queue_on(self, pipe: Any, name: str, payload: Mapping[str, Any]) -> bool:
        """Queue the task's message on ``pipe`` (a pipeline on the broker's Redis), to go with
        what else it carries; False when this queue publishes through Celery, and the caller
        must ``enqueue`` it."""
        if self._broker is None:
            return False
        checked = check_payload(name, payload)
        queue = self._queue_of(name)
        if queue is None:
            return False
        pipe.lpush(queue, broker_message(self._celery, name, checked, queue=queue))
        return True

    def _queue_of(self, name: str) -> str | None:
        route = (self._celery.conf.task_routes or {}).get(name)
        return None if route is None else str(route["queue"])


TaskBody = Callable[[Task, dict[str, str]], dict[str, Any]]


def labvirt_task(
    name: str, *, retry_budget_size: int = DEFAULT_TASK_BUDGET
) -> Callable[[TaskBody], Any]:
    """Declare a task: its payload is checked on arrival, its log lines carry the task's id,
    name and payload ids, and its cluster calls share one retry budget.

    Every labvirt task is safe to run twice, so all are ``acks_late`` (a worker that dies
    mid-task leaves the message for another) and nothing retries them on top of the budget.
    """

    def declare(body: TaskBody) -> Any:
        @functools.wraps(body)
        def run(self: Task, **payload: Any) -> dict[str, Any]:
            checked = check_payload(name, payload)
            structlog.contextvars.bind_contextvars(task_id=self.request.id, task=name, **checked)
            dead_letters: DeadLetters | None = getattr(self.app, "labvirt_dead_letters", None)
            try:
                with retry_budget(retry_budget_size):
                    result = body(self, checked)
            except Exception as exc:
                # Failed for good: nothing retries a labvirt task on top of its budget, so an
                # operator sees it in the dead letters, to requeue once the cause is gone.
                log.exception("task.failed", error=str(exc))
                if dead_letters is not None:
                    dead_letters.record(
                        task=name,
                        payload=checked,
                        task_id=self.request.id,
                        error=exc,
                        traceback=traceback.format_exc(),
                        concerns=checked,
                    )
                raise
            if dead_letters is not None:
                dead_letters.resolved(name, checked)
            return result

        return shared_task(bind=True, name=name, acks_late=True, ignore_result=True)(run)

    return declare


TASK_MODULES = (
    "services.provisioner.tasks",
    "services.reaper.tasks",
    "services.prewarmer.tasks",
    "services.provisioner.pool_tasks",
)


def make_celery(settings: Settings) -> Celery:
    """The Celery app every labvirt process shares; connects to nothing until used."""
    guard_closed_broker_channels()  # a worker reconnects after a Redis restart, not exits
    broker, sentinel_options = celery_broker(settings.redis_url)
    app = Celery("labvirt", broker=broker, backend=None)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        broker_connection_retry_on_startup=True,
        # A task runs at most this long (it creates, deletes or patches; boots are followed by
        # the informer), and one a dead worker held goes back on the queue after the
        # visibility timeout: tasks are idempotent, so a late duplicate does no harm.
        # ``check_celery`` refuses a process whose timeouts do not nest.
        task_time_limit=settings.task_time_limit_seconds,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_seconds,
            **sentinel_options,
        },
        # kombu ships no type hints.
        task_queues=[Queue(name) for name in (*QUEUES, PREWARM_QUEUE)],  # type: ignore[no-untyped-call]
        task_default_queue=MAINTENANCE_QUEUE,
        task_routes={
            PROVISION: {"queue": PROVISION_QUEUE},
            TEARDOWN: {"queue": TEARDOWN_QUEUE},
            REAP: {"queue": MAINTENANCE_QUEUE},
            RECONCILE: {"queue": MAINTENANCE_QUEUE},
            PREWARM: {"queue": MAINTENANCE_QUEUE},
            PREWARM_ENVIRONMENT: {"queue": PREWARM_QUEUE},
            RETIRE_ENVIRONMENT: {"queue": PREWARM_QUEUE},
            BIND_ENVIRONMENT: {"queue": PROVISION_QUEUE},
            CHECK_ENVIRONMENT: {"queue": PREWARM_QUEUE},
        },
        include=list(TASK_MODULES),
        beat_schedule={
            "reap-expired-sessions": {
                "task": REAP,
                "schedule": timedelta(seconds=settings.reaper_interval_seconds),
                "options": {"expires": settings.reaper_interval_seconds * 2},
            },
            "reconcile-cluster-with-redis": {
                "task": RECONCILE,
                "schedule": timedelta(seconds=settings.reconcile_interval_seconds),
                # A pass that waited a whole interval is stale: the next one is already due.
                "options": {"expires": settings.reconcile_interval_seconds},
            },
            "prewarm-pools": {
                "task": PREWARM,
                "schedule": timedelta(seconds=settings.prewarm_interval_seconds),
                "options": {"expires": settings.prewarm_interval_seconds * 2},
            },
        },
        timezone="UTC",
    )
    return app


def check_celery(app: Celery, *, startup_timeout_seconds: float) -> None:
    """Refuse to start on settings that would lose or repeat work wrongly, naming the setting.

    JSON only; every labvirt task ``acks_late`` and rejected when its worker dies (all are
    safe to repeat); prefetch 1; and the timeouts nested: a task's time limit below the
    broker's visibility timeout (or a slow task would run twice at once), and that below the
    shortest session startup timeout (or a dead worker's provision would come back after the
    learner was already told it failed).
    """
    conf = app.conf
    problems = []
    if conf.task_serializer != "json" or list(conf.accept_content) != ["json"]:
        problems.append("task_serializer/accept_content must be JSON only")
    if not conf.task_acks_late or not conf.task_reject_on_worker_lost:
        problems.append("task_acks_late and task_reject_on_worker_lost must be on")
    if conf.worker_prefetch_multiplier != 1:
        problems.append("worker_prefetch_multiplier must be 1")
    for name, task in app.tasks.items():
        if name.startswith("labvirt.") and not getattr(task, "acks_late", False):
            problems.append(f"task {name} must be acks_late")
    limit = float(conf.task_time_limit or 0)
    visibility = float((conf.broker_transport_options or {}).get("visibility_timeout", 0))
    if not 0 < limit < visibility:
        problems.append(
            f"LABVIRT_TASK_TIME_LIMIT_SECONDS ({limit:g}) must be below "
            f"LABVIRT_VISIBILITY_TIMEOUT_SECONDS ({visibility:g})"
        )
    if not visibility < startup_timeout_seconds:
        problems.append(
            f"LABVIRT_VISIBILITY_TIMEOUT_SECONDS ({visibility:g}) must be below the shortest "
            f"session startup timeout ({startup_timeout_seconds:g} s: "
            "LABVIRT_STARTUP_TIMEOUT_SECONDS or the templates' startup_timeout_seconds)"
        )
    if problems:
        raise ConfigError("; ".join(problems))
