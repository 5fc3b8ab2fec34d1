"""Settings that would lose or repeat work stop a process at start, naming what to change."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.adapters.template_files import load_templates
from shared.config import ConfigError, Settings
from shared.jobs import check_celery, make_celery
from shared.runtime import check_startup

TEMPLATES = load_templates(None)  # startup timeouts of 600 s


def settings(**changes: float) -> Settings:
    return dataclasses.replace(Settings(), **changes)  # type: ignore[arg-type]


def test_the_shipped_defaults_nest() -> None:
    app = make_celery(Settings())
    check_startup(Settings(), app, TEMPLATES)  # raises nothing
    assert app.conf.task_time_limit == 120
    assert app.conf.broker_transport_options["visibility_timeout"] == 300


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"task_time_limit_seconds": 400.0}, "LABVIRT_TASK_TIME_LIMIT_SECONDS (400)"),
        ({"visibility_timeout_seconds": 60.0}, "LABVIRT_VISIBILITY_TIMEOUT_SECONDS (60)"),
        ({"visibility_timeout_seconds": 900.0}, "shortest session startup timeout (600 s"),
        ({"startup_timeout_seconds": 200}, "shortest session startup timeout (200 s"),
        ({"provision_recovery_seconds": 600.0}, "LABVIRT_PROVISION_RECOVERY_SECONDS (600)"),
    ],
)
def test_timeouts_that_do_not_nest_are_refused(changes: dict[str, float], named: str) -> None:
    wrong = settings(**changes)
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(")", r"\)")):
        check_startup(wrong, make_celery(wrong), TEMPLATES)


def test_every_labvirt_task_must_be_safe_to_redeliver() -> None:
    app = make_celery(Settings())
    app.loader.import_default_modules()
    app.conf.task_reject_on_worker_lost = False
    with pytest.raises(ConfigError, match="task_reject_on_worker_lost"):
        check_celery(app, startup_timeout_seconds=600)


def test_a_process_started_with_them_exits_with_the_reason(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("LABVIRT_")}
    env.update({"LABVIRT_MODE": "dev", "LABVIRT_VISIBILITY_TIMEOUT_SECONDS": "900"})
    result = subprocess.run(
        [str(Path(sys.executable).with_name("labvirt")), "beat"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "labvirt beat: configuration error: LABVIRT_VISIBILITY_TIMEOUT_SECONDS (900)" in (
        result.stderr
    )


@pytest.mark.parametrize(
    ("mode", "variable", "token"),
    [
        ("production", "LABVIRT_FRONTEND_TOKENS", "replace-with-a-long-random-token"),
        ("production", "LABVIRT_ADMIN_TOKENS", "changeme-changeme-changeme"),
        ("dev", "LABVIRT_FRONTEND_TOKENS", "e2e-frontend-token-0123456789"),
    ],
)
def test_the_api_started_with_a_weak_token_exits_naming_the_variable(
    tmp_path: Path, mode: str, variable: str, token: str
) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("LABVIRT_")}
    env.update(
        {
            "LABVIRT_MODE": mode,
            "LABVIRT_FRONTEND_TOKENS": "frontend-0cc175b9c0f1b6a831c399e269772661",
            "LABVIRT_ADMIN_TOKENS": "admin-92eb5ffee6ae2fec3ad71c777531578f",
            variable: token,
        }
    )
    result = subprocess.run(
        [str(Path(sys.executable).with_name("labvirt")), "api"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert f"labvirt api: configuration error: {variable}: token 1 of 1 " in result.stderr
    assert token not in result.stderr + result.stdout
