"""Operators and failed tasks: the admin API (admin token only) and ``labvirt ops`` driving it
over real HTTP, with readable tables at 80 columns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest
import redis

from labvirt import ops
from services.api.app import create_app
from shared.adapters.session_store import RedisSessionStore
from shared.adapters.template_files import load_templates
from shared.domain.lifecycle import clocks_for, start_session
from shared.jobs import PROVISION, TEARDOWN
from shared.runtime import Runtime
from tests.doubles import RecordingCelery
from tests.unit.test_api import ADMIN, FRONTEND, make_settings

TEMPLATES = load_templates(None)


class Quiet(WSGIRequestHandler):
    def log_message(self, *_: Any) -> None:
        return


@pytest.fixture
def runtime(redis_url: str) -> Iterator[Runtime]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield Runtime(
        settings=make_settings(),
        redis=client,
        sessions=RedisSessionStore(client),
        templates=TEMPLATES,
        celery=RecordingCelery(),  # type: ignore[arg-type]
    )
    client.flushdb()
    client.close()


@pytest.fixture
def server(runtime: Runtime) -> Iterator[str]:
    httpd = make_server("127.0.0.1", 0, create_app(runtime), handler_class=Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()


def failure(runtime: Runtime, task: str = PROVISION, session: str = "s-" + "a" * 24) -> str:
    letter = runtime.dead_letters.record(
        task=task,
        payload={"session_id": session},
        task_id="celery-task-1",
        error=RuntimeError("VM lv-x-ubuntu reached phase Failed"),
        traceback="Traceback (most recent call last):\n  ...\nRuntimeError: boom",
    )
    return letter.id


def run_ops(server: str, *argv: str, token: str = ADMIN) -> tuple[int, str, str]:
    """``labvirt ops`` as an operator types it (the installed console script)."""
    environ = {
        "PATH": os.environ.get("PATH", ""),
        "LABVIRT_API_URL": server,
        "LABVIRT_ADMIN_TOKENS": token,
        "LABVIRT_OPERATOR": "kim",
    }
    done = subprocess.run(
        [str(Path(sys.executable).with_name("labvirt")), "ops", *argv],
        env=environ,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done.returncode, done.stdout.rstrip("\n"), done.stderr


def test_failed_tasks_are_for_admins_only(runtime: Runtime) -> None:
    client = create_app(runtime).test_client()
    for token, status in ((None, 401), ("nobody-" + "x" * 20, 401), (FRONTEND, 403)):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = client.get("/v1/admin/failed", headers=headers)
        assert response.status_code == status, (token, response.get_json())
        assert response.mimetype == "application/problem+json"
    assert client.get("/v1/admin/failed", headers={"Authorization": f"Bearer {ADMIN}"}).is_json


def test_list_show_requeue_and_purge_through_the_cli(runtime: Runtime, server: str) -> None:
    first = failure(runtime)
    failure(runtime, task=TEARDOWN, session="s-" + "b" * 24)

    code, listing, _ = run_ops(server, "failed", "list")
    assert code == 0
    lines = listing.splitlines()
    assert lines[0].split()[:4] == ["ID", "TASK", "STATUS", "TRIES"]
    assert all(len(line) <= 80 for line in lines), listing
    assert any(first in line and "provision" in line for line in lines), listing
    assert lines[-1] == "2 in all"

    code, shown, _ = run_ops(server, "failed", "show", first)
    assert code == 0
    assert "RuntimeError: VM lv-x-ubuntu reached phase Failed" in shown
    assert '"session_id": "s-aaaaaaaaaaaaaaaaaaaaaaaa"' in shown

    code, said, _ = run_ops(server, "failed", "requeue", first)
    assert (code, said) == (0, f"requeued {first}")
    code, said, _ = run_ops(server, "failed", "requeue", first)
    assert (code, said) == (0, f"already queued {first}")
    celery: Any = runtime.celery
    assert [(t.name, t.payload) for t in celery.sent] == [
        (PROVISION, {"session_id": "s-" + "a" * 24})
    ]
    code, shown, _ = run_ops(server, "--json", "failed", "show", first)
    record = json.loads(shown)
    assert record["status"] == "requeued"
    assert record["requeues"][0]["by"].startswith("kim (admin ")

    code, said, _ = run_ops(server, "failed", "purge", first)
    assert (code, said) == (0, f"purged {first}")
    code, _, error = run_ops(server, "failed", "show", first)
    assert code == 1
    assert "404 failure_not_found" in error


def test_requeue_every_match(runtime: Runtime, server: str) -> None:
    for letter in "cde":
        failure(runtime, session="s-" + letter * 24)
    failure(runtime, task=TEARDOWN, session="s-" + "f" * 24)
    code, said, _ = run_ops(server, "failed", "requeue", "--all", "--task", PROVISION)
    assert (code, said) == (0, "requeued 3, already queued 0")
    celery: Any = runtime.celery
    assert sorted(t.payload["session_id"][2] for t in celery.sent) == ["c", "d", "e"]


def test_sessions_listing_filters_by_user(runtime: Runtime, server: str) -> None:
    for user in ("ana", "ben"):
        session, _ = start_session(
            user=user,
            template="ubuntu",
            region="local",
            clocks=clocks_for(TEMPLATES["ubuntu"]),
            now=runtime.clock(),
        )
        runtime.sessions.add(session)
    code, listing, _ = run_ops(server, "sessions", "list", "--user", "ben")
    assert code == 0
    rows = listing.splitlines()[1:-1]
    assert [row.split()[1] for row in rows] == ["ben"], listing
    assert listing.splitlines()[-1] == "1 in all"


def test_a_wrong_token_is_a_clear_error(server: str) -> None:
    code, _, error = run_ops(server, "failed", "list", token="nobody-" + "x" * 20)
    assert code == 1
    assert error.startswith("labvirt ops: 401 unauthorized: ")


def test_a_frontend_token_is_told_it_does_not_reach_the_admin_api(server: str) -> None:
    code, _, error = run_ops(server, "failed", "list", token=FRONTEND)
    assert code == 1
    assert error.startswith("labvirt ops: 403 forbidden: this call needs an admin token")


def test_the_operator_sees_which_field_was_wrong(server: str) -> None:
    code, _, error = run_ops(server, "failed", "list", "--limit", "0")
    assert code == 1
    assert error.splitlines() == [
        "labvirt ops: 400 invalid_request: the query is invalid",
        "  #/query/limit: a whole number from 1 to 500",
    ]


def test_tables_fit_eighty_columns_whatever_the_values() -> None:
    rendered = ops.table([("x" * 60, "y" * 60, 3)], ("A", "B", "C"))
    assert all(len(line) <= 80 for line in rendered.splitlines())
    assert "…" in rendered


def test_ops_only_ever_calls_an_http_api(tmp_path: Path) -> None:
    secret = tmp_path / "not-the-api.json"
    secret.write_text('{"records": []}')
    code, out, error = run_ops(secret.as_uri(), "failed", "list")
    assert code == 1
    assert out == ""
    assert "LABVIRT_API_URL=" in error
    assert "is not an http:// or https:// URL" in error
