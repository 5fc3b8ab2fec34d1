"""The operators' dashboard in a real browser, headless Chromium, against the whole system.

An operator signs in with the admin token, sizes the ubuntu pool to 2 on the page and watches
it fill as the prewarmer boots the environments in the simulator (the page refreshes itself),
resizes it, and requeues a failed task, whose record then shows the requeue and who asked.
The page is reached through the gateway, as `labvirt dev` serves it; the API answers it.

Screenshots go to ``LABVIRT_TEST_ARTIFACTS`` (default: under pytest's temporary directory);
with ``LABVIRT_UPDATE_SCREENSHOTS=1`` the last one also becomes docs/images/ops-dashboard.png,
the README's picture. Chromium and chromedriver come from Debian, as for the learner page.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import redis
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from shared.adapters.dead_letters import DeadLetters
from shared.jobs import TEARDOWN
from tests.conftest import claim_redis_database
from tests.e2e.browser import headless_chromium
from tests.e2e.harness import ADMIN_TOKEN, System, start_system

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
README_IMAGE = REPO / "docs" / "images" / "ops-dashboard.png"
OPERATOR = "on-call"
UBUNTU_POOL = 'tr[data-pool="local/ubuntu"]'
# Fast boots, and the prewarmer's tick every second.
SIM_ARGS = ["--time-scale", "0.2"]
FAST_PREWARM = {"LABVIRT_PREWARM_INTERVAL_SECONDS": "1"}
STALE = (NoSuchElementException, StaleElementReferenceException)


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with claim_redis_database() as url:
        running = start_system(
            url, tmp_path_factory.mktemp("ops-dashboard"), extra_env=FAST_PREWARM, sim_args=SIM_ARGS
        )
        try:
            yield running
        finally:
            running.stop()


@pytest.fixture
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("LABVIRT_TEST_ARTIFACTS")
    directory = Path(given) if given else tmp_path_factory.getbasetemp() / "artifacts"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    with headless_chromium(tmp_path / "chromium-profile", width=1280, height=1000) as driver:
        yield driver


def seed_failure(system: System) -> str:
    """A teardown that failed for good, recorded as the worker records one."""
    client = redis.Redis.from_url(system.redis_url)
    try:
        letter = DeadLetters(client).record(
            task=TEARDOWN,
            payload={"session_id": "s-0e2e0e2e0e2e0e2e0e2e0e2e"},
            task_id="celery-e2e-1",
            error=RuntimeError("the cluster refused the delete: 503 Service Unavailable"),
            traceback="Traceback (most recent call last):\n  ...",
        )
    finally:
        client.close()
    return letter.id


def admin(system: System, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    response = system.call(method, path, token=ADMIN_TOKEN, **kwargs)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def cell(driver: WebDriver, selector: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, selector).text).strip()


def notice(driver: WebDriver) -> str:
    return cell(driver, "#notice")


def submit_size(driver: WebDriver, size: int) -> None:
    field = driver.find_element(By.CSS_SELECTOR, f"{UBUNTU_POOL} input.size")
    field.clear()
    field.send_keys(str(size))
    driver.find_element(By.CSS_SELECTOR, f"{UBUNTU_POOL} button.resize").click()


def screenshot(driver: WebDriver, path: Path) -> None:
    """The whole page: the window grows to the page's height first."""
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.set_window_size(1280, max(800, height + 120))
    assert driver.save_screenshot(str(path)), path


@contextmanager
def explained(driver: WebDriver, system: System, artifacts: Path) -> Iterator[None]:
    """On failure: a screenshot, what the page said and what labvirt logged."""
    try:
        yield
    except Exception as exc:
        with suppress(Exception):
            driver.save_screenshot(str(artifacts / "ops-dashboard-failure.png"))
            exc.add_note(
                f"page: {driver.current_url}\n{driver.find_element(By.TAG_NAME, 'main').text}"
            )
            exc.add_note("browser console:\n" + "\n".join(map(str, driver.get_log("browser"))))
        exc.add_note(system.logs())
        raise


def test_an_operator_fills_resizes_a_pool_and_requeues_a_failure_on_the_dashboard(
    system: System, browser: WebDriver, artifacts: Path
) -> None:
    driver = browser
    failure_id = seed_failure(system)
    wait = WebDriverWait(driver, 30, ignored_exceptions=STALE)
    sessions: list[str] = []

    with explained(driver, system, artifacts):
        driver.get(f"{system.base_url}/ui/ops")
        driver.find_element(By.ID, "token").send_keys(ADMIN_TOKEN)
        driver.find_element(By.ID, "operator").send_keys(OPERATOR)
        screenshot(driver, artifacts / "ops-sign-in.png")
        driver.find_element(By.ID, "sign-in").click()
        wait.until(lambda d: d.find_elements(By.ID, "pools"))
        assert ADMIN_TOKEN not in driver.current_url
        (cookie,) = driver.get_cookies()
        assert cookie["httpOnly"] is True
        assert cookie["sameSite"] == "Strict"
        assert ADMIN_TOKEN not in cookie["value"]
        assert f"signed in: {OPERATOR} (admin " in cell(driver, ".who")

        # Size the pool to 2 and watch the prewarmer fill it (the page refreshes itself).
        submit_size(driver, 2)
        wait.until(lambda d: notice(d) == "The ubuntu pool of local now aims at 2 ready.")
        assert cell(driver, f"{UBUNTU_POOL} td.target") == "2"
        WebDriverWait(driver, 120, ignored_exceptions=STALE).until(
            lambda d: cell(d, f"{UBUNTU_POOL} td.ready") == "2"
        )
        screenshot(driver, artifacts / "ops-pool-filled.png")

        # Learners come: one takes a warm environment, one boots a cold kubernetes one; the
        # page counts them and charts how long each waited.
        warm = system.create("ubuntu", "warm-learner")
        cold = system.create("kubernetes", "cold-learner")
        sessions += [warm["id"], cold["id"]]
        system.wait_state(cold["id"], "ready", timeout=120)
        WebDriverWait(driver, 60, ignored_exceptions=STALE).until(
            lambda d: (
                "kubernetes · cold" in cell(d, "#ready-times")
                and "ubuntu · warm" in cell(d, "#ready-times")
            )
        )
        assert cell(driver, '#live tr[data-region="local"] td.strong') == "2"

        # Resize it down.
        submit_size(driver, 1)
        wait.until(lambda d: notice(d) == "The ubuntu pool of local now aims at 1 ready.")
        assert cell(driver, f"{UBUNTU_POOL} td.target") == "1"
        [view] = [
            p
            for p in admin(system, "GET", "/v1/admin/pools")["pools"]
            if p["template"] == "ubuntu" and p["region"] == "local"
        ]
        assert (view["mode"], view["target"]) == ("static", 1)

        # Requeue the failed task; its record says who asked.
        row = f'tr[data-failure="{failure_id}"]'
        assert "503 Service Unavailable" in cell(driver, row)
        driver.find_element(By.CSS_SELECTOR, f"{row} button.requeue").click()
        wait.until(lambda d: notice(d) == f"{TEARDOWN} ({failure_id}) is queued again.")
        shown = cell(driver, row)
        assert "requeued" in shown or "resolved" in shown, shown  # the teardown may be done
        assert f"by {OPERATOR} (admin " in shown
        record = admin(system, "GET", f"/v1/admin/failed/{failure_id}")
        assert record["status"] in ("requeued", "resolved")
        assert [r["by"].split(" ")[0] for r in record["requeues"]] == [OPERATOR]

        final = artifacts / "ops-dashboard.png"
        screenshot(driver, final)
        if os.environ.get("LABVIRT_UPDATE_SCREENSHOTS") == "1":
            README_IMAGE.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(final, README_IMAGE)

        driver.find_element(By.ID, "sign-out").click()
        wait.until(lambda d: d.find_elements(By.ID, "token"))
        assert driver.get_cookies() == []

    for session_id in sessions:
        assert system.call("DELETE", f"/v1/sessions/{session_id}").status_code == 202
    admin(system, "PUT", "/v1/admin/pools/ubuntu", json={"size": 0})
