"""An on-call engineer, in a real browser, watches a run diverge, reads the orchestrator's proposal of a
rollback with an LR cut, approves it, and watches the run recover.

Debian's headless Chromium, driven by Selenium through Debian's chromedriver (nothing is downloaded: the
driver's path is given and Selenium Manager is kept offline). Real torchrun attempts under a real
orchestrator, against a real control plane process that serves the console. Screenshots of the run page
(waiting for the answer, and recovered) are saved under test-artifacts/console/ (or
$TRAINOPS_TEST_ARTIFACTS)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from service.crud.decisions import list_decisions
from service.models import Run
from service.statemachine import DecisionStatus
from tests.e2e.test_orchestrator_e2e import Stack, in_thread, stack  # noqa: F401  (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.browser]
T = TypeVar("T")

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTIFACTS = Path(
    os.environ.get("TRAINOPS_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts")
)


@pytest.fixture
def browser() -> Iterator[object]:
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not try to download a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), "apt-get install chromium chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,2400"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


def until(
    condition: Callable[[], bool], *, timeout: float = 180.0, refresh: Callable[[], None] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while not settled(condition):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(1.0)
        if refresh is not None:
            refresh()


def settled(read: Callable[[], T]) -> T:
    """`read` of the page, again when htmx swapped the live part between finding an element and reading it
    (it replaces the part every 5 s)."""
    from selenium.common.exceptions import StaleElementReferenceException

    for _ in range(10):
        try:
            return read()
        except StaleElementReferenceException:
            time.sleep(0.2)
    return read()


def test_an_operator_approves_a_rollback_in_the_browser_and_the_run_recovers(
    stack: Stack,  # noqa: F811
    browser: object,
) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    driver: object = browser
    run_id = stack.create_run(
        # 28 steps after the LR blow-up: at 7-10 steps a second a loaded CI saw attempt 1 reach a 32-step
        # target before its diverging metrics were judged (it then ends `completed`, nothing to approve)
        target_steps=48,
        faults=["1:diverge:step=20,factor=100"],
        approvals={"require": ["lr_cut"], "timeout_s": 600, "on_timeout": "hold"},
    )
    out = stack.server.cli("tokens", "create", "--name", "oncall", "--role", "operator").stdout
    token = out.strip().splitlines()[-1]
    orchestrator = stack.orchestrator()
    thread = in_thread(orchestrator)
    shots = ARTIFACTS / "console"
    shots.mkdir(parents=True, exist_ok=True)
    try:
        # signing in: the console sends a stranger to the login form, then back where they were going
        driver.get(f"{stack.server.url}/ui/runs/{run_id}")  # type: ignore[attr-defined]
        assert "/ui/login" in driver.current_url  # type: ignore[attr-defined]
        driver.find_element(By.ID, "token").send_keys(token)  # type: ignore[attr-defined]
        driver.find_element(By.ID, "sign-in").click()  # type: ignore[attr-defined]
        # a click returns before the form's navigation ends: wait for the redirect to land
        until(lambda: driver.current_url.endswith(f"/ui/runs/{run_id}"), timeout=60.0)  # type: ignore[attr-defined]
        assert driver.get_cookie("trainops_console")["httpOnly"] is True  # type: ignore[attr-defined]

        # the divergence ends attempt 1; the proposal appears on the page (htmx refreshes it)
        def proposal_shown() -> bool:
            return bool(driver.find_elements(By.CSS_SELECTOR, ".decision-pending form.answer"))  # type: ignore[attr-defined]

        until(proposal_shown)
        page = settled(lambda: driver.find_element(By.ID, "decisions").text)  # type: ignore[attr-defined]
        assert "lr_cut" in page and "LR scale 1 -> 0.5" in page
        assert settled(lambda: driver.find_element(By.ID, "phase").text) == "restarting"  # type: ignore[attr-defined]
        assert "polyline" in driver.page_source  # the loss curve, drawn from the metrics table  # type: ignore[attr-defined]
        driver.save_screenshot(str(shots / "run-page-proposal.png"))  # type: ignore[attr-defined]
        assert any("awaits approval" in p["reason"] for p in stack.pages)  # on-call was paged

        # The live part is swapped every 5 s but not while a field of its forms has the focus: a swap
        # between finding the form and typing into it is retried.
        for _ in range(5):
            try:
                form = driver.find_element(By.CSS_SELECTOR, ".decision-pending form[id^=approve-]")  # type: ignore[attr-defined]
                form.find_element(By.NAME, "reason").send_keys("rollback as OPT did")
                form.find_element(By.CSS_SELECTOR, "button.approve").click()
                break
            except StaleElementReferenceException:
                continue
        else:
            raise AssertionError("the approve form kept being replaced")

        def answered_in_the_catalog() -> bool:  # the post has landed: a refresh can no longer cancel it
            with stack.factory() as session:
                return list_decisions(session, run_id=run_id)[0][0].status != DecisionStatus.pending

        until(answered_in_the_catalog, timeout=60.0)

        def recovered() -> bool:
            return driver.find_element(By.ID, "phase").text == "completed"  # type: ignore[attr-defined]

        until(recovered, timeout=240.0, refresh=driver.refresh)  # type: ignore[attr-defined]
        driver.save_screenshot(str(shots / "run-page-recovered.png"))  # type: ignore[attr-defined]
        answered = settled(lambda: driver.find_element(By.ID, "decisions").text)  # type: ignore[attr-defined]
        assert "answered by user:oncall: rollback as OPT did" in answered
        assert "carried out by attempt 2" in answered
        # the curves: attempt 2's recomputation its own line; attempt 1's steps past the restore point faded
        source = driver.page_source  # type: ignore[attr-defined]
        assert 'class="line kept attempt-2"' in source and 'class="line abandoned attempt-1"' in source
    finally:
        orchestrator.stop()
        thread.join(10)

    with stack.factory() as session:
        run = session.get(Run, run_id)
        assert run.phase.value == "completed" and run.attempts[1].overrides["lr_scale"] == 0.5
        (decision,) = list_decisions(session, run_id=run_id)[0]
        assert decision.status == DecisionStatus.approved and decision.decided_by == "user:oncall"
    assert (shots / "run-page-proposal.png").stat().st_size > 10_000
