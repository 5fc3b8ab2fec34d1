"""The learner page in a real browser: `labvirt dev` as a user starts it, headless Chromium.

Pick the ubuntu template, watch it become ready, type ``hostname`` into the VM's terminal and
read the answer off the screen; then leave the page and see the environment's VMIs go.
Chromium and chromedriver come from Debian (``apt-get install chromium chromium-driver``);
without them the test is skipped, except under CI, where it fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest
import requests
from kubernetes import client, config
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from shared.adapters.redis_server import free_port
from tests.e2e.browser import headless_chromium, require_chromium
from tests.e2e.harness import wait_until

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
MANAGED = "app.kubernetes.io/managed-by=labvirt"
SESSION_LABEL = "labvirt.io/session"
NAMESPACE = "default"
TEMPLATE = "ubuntu"
HOSTNAME = "ubuntu"

# What xterm.js's DOM renderer shows, one string per row (it draws spaces as NBSPs).
ROWS_JS = """
const pane = document.querySelector(`.terminal[data-vm="${arguments[0]}"]`);
if (!pane) return [];
return Array.from(pane.querySelectorAll(".xterm-rows > div"),
                  (row) => row.textContent.replace(/\\u00a0/g, " ").trimEnd());
"""


def artifacts_dir() -> Path:
    directory = Path(os.environ.get("LABVIRT_TEST_ARTIFACTS") or REPO / "test-artifacts")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@dataclass
class Dev:
    base: str  # "labvirt is up: ..."
    page: str  # "learner page: ..."
    frontend_token: str
    run_dir: Path
    lines: list[str]

    def log(self, last: int = 60) -> str:
        return "".join(self.lines[-last:])


@pytest.fixture
def chromium() -> None:
    require_chromium()


@pytest.fixture
def dev(own_redis_url: str, tmp_path: Path) -> Iterator[Dev]:
    """`labvirt dev` through the CLI, its own Redis and a free port, as `make run` starts it."""
    run_dir = tmp_path / "run"
    env = dict(os.environ)
    env.update({"REDIS_URL": own_redis_url, "LABVIRT_API_PORT": str(free_port())})
    for name in ("LABVIRT_KUBECONFIG", "LABVIRT_CLUSTERS", "LABVIRT_FRONTEND_TOKENS"):
        env.pop(name, None)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "labvirt.cli",
            "dev",
            "--run-dir",
            str(run_dir),
            "--sim-boot-seconds",
            "1",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(process.stdout or []), daemon=True).start()
    try:

        def banner() -> bool:
            assert process.poll() is None, "labvirt dev exited:\n" + "".join(lines[-60:])
            return any("Ctrl-C stops everything" in line for line in lines)

        wait_until(banner, timeout=90, what="labvirt dev's banner")

        def printed(label: str) -> str:
            return next(line.split(label, 1)[1].strip() for line in lines if label in line)

        yield Dev(
            base=printed("labvirt is up:"),
            page=printed("learner page:"),
            frontend_token=printed("frontend token:"),
            run_dir=run_dir,
            lines=lines,
        )
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def browser(chromium: None, tmp_path: Path) -> Iterator[WebDriver]:
    with headless_chromium(tmp_path / "chromium-profile", width=1280, height=900) as driver:
        yield driver


def labvirt_vmis(kube: client.CustomObjectsApi) -> dict[str, str]:
    """labvirt's VMIs in the namespace, each with the session it belongs to."""
    listed = kube.list_namespaced_custom_object(
        "kubevirt.io", "v1", NAMESPACE, "virtualmachineinstances", label_selector=MANAGED
    )
    return {
        item["metadata"]["name"]: item["metadata"]["labels"].get(SESSION_LABEL, "")
        for item in listed["items"]
    }


def rows(driver: WebDriver, vm: str) -> list[str]:
    return list(driver.execute_script(ROWS_JS, vm))


def hostname_answered(lines: list[str]) -> bool:
    """``hostname`` typed at the prompt, and the VM's hostname on the line after it alone."""
    return any(
        line.endswith("$ hostname") and following.strip() == HOSTNAME
        for line, following in pairwise(lines)
    )


@contextmanager
def explained(driver: WebDriver, dev: Dev, vm: str | None = None) -> Iterator[None]:
    """On failure: a screenshot next to the artefacts and what the page and labvirt said."""
    try:
        yield
    except Exception as exc:
        with suppress(Exception):
            driver.save_screenshot(str(artifacts_dir() / "learner-page-failure.png"))
            exc.add_note(f"status line: {driver.find_element(By.ID, 'status').text!r}")
            if vm:
                exc.add_note("terminal:\n" + "\n".join(rows(driver, vm)))
            exc.add_note("browser console:\n" + "\n".join(map(str, driver.get_log("browser"))))
        exc.add_note("labvirt dev (last lines):\n" + dev.log())
        raise


def test_learner_page_runs_hostname_on_the_vm_and_leaving_deletes_its_vmis(
    chromium: None, dev: Dev, browser: WebDriver
) -> None:
    driver = browser
    kube = client.CustomObjectsApi(
        config.new_client_from_config(config_file=str(dev.run_dir / "sim.kubeconfig"))
    )
    wait = WebDriverWait(driver, 60)

    with explained(driver, dev):
        driver.get(dev.page)
        template = (By.CSS_SELECTOR, f'button.template[data-template="{TEMPLATE}"]')
        wait.until(ec.element_to_be_clickable(template)).click()
        wait.until(
            ec.presence_of_element_located((By.CSS_SELECTOR, '#stages li[data-stage="ready"]'))
        )
        tab = wait.until(
            ec.visibility_of_element_located((By.CSS_SELECTOR, "#tabs button[data-vm]"))
        )
        vm = str(tab.get_attribute("data-vm"))
        assert tab.text == HOSTNAME

    with explained(driver, dev, vm):
        pane = wait.until(
            ec.visibility_of_element_located((By.CSS_SELECTOR, f'.terminal[data-vm="{vm}"]'))
        )
        wait.until(lambda d: any(row.endswith(f"@{HOSTNAME}:~$") for row in rows(d, vm)))
        sessions = set(labvirt_vmis(kube).values())
        assert len(sessions) == 1, f"one session's VMIs, not {sessions}"

        # Keys go where the learner's would: xterm's helper textarea, focused.
        keyboard = pane.find_element(By.CSS_SELECTOR, ".xterm-helper-textarea")
        driver.execute_script("arguments[0].focus();", keyboard)
        ActionChains(driver).send_keys("hostname" + Keys.ENTER).perform()
        WebDriverWait(driver, 20).until(lambda d: hostname_answered(rows(d, vm)))

        screenshot = artifacts_dir() / "learner-page.png"
        assert driver.save_screenshot(str(screenshot)), screenshot

    # Leaving the page fires pagehide: its beacon closes the session and the VMIs go, well
    # before the gateway would notice the closed connections (after its grace time).
    driver.get("about:blank")
    with explained(driver, dev):
        wait_until(
            lambda: not labvirt_vmis(kube),
            timeout=30,
            what="the session's VMIs to be deleted after the page closed",
            interval=0.5,
        )
        (session_id,) = sessions
        answer = requests.get(
            f"{dev.base}/v1/sessions/{session_id}",
            headers={"Authorization": f"Bearer {dev.frontend_token}"},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json().get("reason") == "closed", answer.text  # the beacon, not a timeout
