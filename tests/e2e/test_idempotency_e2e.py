"""Retried creates through the real API process: concurrent duplicates with one
``Idempotency-Key`` open one session and all get the first answer."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import requests

from tests.e2e.harness import ADMIN_TOKEN, FRONTEND_TOKEN, System

pytestmark = pytest.mark.e2e

RACERS = 6


def test_concurrent_duplicates_open_one_session_and_answer_alike(system: System) -> None:
    user = "ida"  # a user no other end-to-end test opens sessions for
    start = threading.Barrier(RACERS)
    answers: list[tuple[int, str, str | None]] = []
    lock = threading.Lock()

    def create() -> None:
        with requests.Session() as http:  # one connection per racer, as separate clients
            start.wait()
            response = http.post(
                system.base_url + "/v1/sessions",
                json={"template": "ubuntu", "user": user},
                headers={
                    "Authorization": f"Bearer {FRONTEND_TOKEN}",
                    "Idempotency-Key": f"e2e-{user}-create-1",
                },
                timeout=20,
            )
        with lock:
            answers.append((response.status_code, response.text, response.headers.get("Location")))

    racers = [threading.Thread(target=create) for _ in range(RACERS)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(timeout=30)

    assert len(answers) == RACERS, system.logs()
    assert {status for status, _, _ in answers} == {201}, answers
    assert len(set(answers)) == 1, answers
    listed = system.call("GET", f"/v1/admin/sessions?user={user}", token=ADMIN_TOKEN)
    assert listed.status_code == 200, listed.text
    sessions: list[dict[str, Any]] = listed.json()["sessions"]
    assert len(sessions) == 1, sessions
    created = system.session(sessions[0]["id"])
    assert answers[0][2] == f"/v1/sessions/{created['id']}"

    assert system.call("DELETE", f"/v1/sessions/{created['id']}").status_code == 202
    assert system.wait_state(created["id"], "ended", "failed")["state"] == "ended"
