"""Warm pools' knobs and their place in the task contract."""

from __future__ import annotations

from datetime import timedelta

import pytest

from shared.config import ConfigError, Settings
from shared.jobs import (
    BIND_ENVIRONMENT,
    PREWARM,
    PREWARM_ENVIRONMENT,
    PREWARM_QUEUE,
    PROVISION_QUEUE,
    QUEUES,
    RETIRE_ENVIRONMENT,
    TASK_MODULES,
    make_celery,
)

BASE = {"LABVIRT_MODE": "dev"}


def test_pool_knobs_have_documented_defaults() -> None:
    settings = Settings.from_env(BASE)
    assert settings.prewarm_interval_seconds == 5.0
    assert settings.prewarm_batch == 10
    assert settings.prewarm_max_in_flight == 20
    assert settings.pool_max_warm_age_seconds == 4 * 3600


def test_pool_knobs_come_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            **BASE,
            "LABVIRT_PREWARM_INTERVAL_SECONDS": "2.5",
            "LABVIRT_PREWARM_BATCH": "3",
            "LABVIRT_PREWARM_MAX_IN_FLIGHT": "7",
            "LABVIRT_POOL_MAX_WARM_AGE_SECONDS": "600",
        }
    )
    assert (
        settings.prewarm_interval_seconds,
        settings.prewarm_batch,
        settings.prewarm_max_in_flight,
        settings.pool_max_warm_age_seconds,
    ) == (2.5, 3, 7, 600.0)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LABVIRT_PREWARM_INTERVAL_SECONDS", "0"),
        ("LABVIRT_PREWARM_INTERVAL_SECONDS", "nan"),
        ("LABVIRT_PREWARM_BATCH", "0"),
        ("LABVIRT_PREWARM_MAX_IN_FLIGHT", "many"),
        ("LABVIRT_POOL_MAX_WARM_AGE_SECONDS", "10"),
    ],
)
def test_bad_pool_knobs_stop_the_process_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({**BASE, name: value})


def test_prewarming_has_its_own_queue_that_the_default_worker_leaves_alone() -> None:
    app = make_celery(Settings.from_env({**BASE, "LABVIRT_PREWARM_INTERVAL_SECONDS": "3"}))
    routes = app.conf.task_routes
    assert routes[PREWARM_ENVIRONMENT] == {"queue": PREWARM_QUEUE}
    assert routes[RETIRE_ENVIRONMENT] == {"queue": PREWARM_QUEUE}
    # Binding a claimed environment serves a learner who is already waiting.
    assert routes[BIND_ENVIRONMENT] == {"queue": PROVISION_QUEUE}
    assert PREWARM_QUEUE not in QUEUES
    assert PREWARM_QUEUE in {queue.name for queue in app.conf.task_queues}
    schedule = app.conf.beat_schedule["prewarm-pools"]
    assert (schedule["task"], schedule["schedule"]) == (PREWARM, timedelta(seconds=3))
    assert {"services.prewarmer.tasks", "services.provisioner.pool_tasks"} <= set(TASK_MODULES)
