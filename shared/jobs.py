"""The contract between services: Celery task names, queues and the Celery app's wiring.

Services enqueue by task name and plain ids, never by importing each other's modules.
"""

from __future__ import annotations

from datetime import timedelta

from celery import Celery
from kombu.entity import Queue

from shared.config import Settings

PROVISION = "labvirt.provision"
TEARDOWN = "labvirt.teardown"
REAP = "labvirt.reap"
RECONCILE = "labvirt.reconcile"
# Warm pools: beat's tick, booting and retiring pooled environments, binding a claimed one.
PREWARM = "labvirt.prewarm"
PREWARM_ENVIRONMENT = "labvirt.prewarm_environment"
RETIRE_ENVIRONMENT = "labvirt.retire_environment"
BIND_ENVIRONMENT = "labvirt.bind_environment"

# User-facing work has its own queue so it never waits behind maintenance.
PROVISION_QUEUE = "provision"
TEARDOWN_QUEUE = "teardown"
MAINTENANCE_QUEUE = "maintenance"
QUEUES = (PROVISION_QUEUE, TEARDOWN_QUEUE, MAINTENANCE_QUEUE)
# Booting pool environments: consumed by its own worker (`labvirt worker --queues prewarm`),
# never by the default one, so prewarming can never hold the threads learners wait for.
PREWARM_QUEUE = "prewarm"

TASK_MODULES = (
    "services.provisioner.tasks",
    "services.reaper.tasks",
    "services.prewarmer.tasks",
    "services.provisioner.pool_tasks",
)


def make_celery(settings: Settings) -> Celery:
    """The Celery app every labvirt process shares; connects to nothing until used."""
    app = Celery("labvirt", broker=settings.redis_url, backend=None)
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
        # A task a dead worker held goes back on the queue after this long. It must outlast
        # the longest provision (a slow boot under emulation); tasks are idempotent, so a
        # late duplicate does no harm, while a long timeout only delays recovery.
        broker_transport_options={"visibility_timeout": 900},
        task_queues=[Queue(name) for name in (*QUEUES, PREWARM_QUEUE)],
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
