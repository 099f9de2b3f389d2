"""The admin UI in a real browser (Playwright + Debian's Chromium) against the app under a real uvicorn.

A phantom study (localizer, thick bone-kernel series, 3 mm soft series) is received through the real spool
and store, routed by the pipeline's Runner with the UI's rules provider and analysed by the real analysis
step; its delivery fails (closed port). Then, in the browser: log in, edit a rule with a mistake (the error
shows, nothing is saved), dry-run the rules against the study (the soft series is marked, reasons shown),
save, re-run the job, resend the failed delivery. Screenshots of every page go to ``test-artifacts/web/``.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from web_testing import ADMIN_PASSWORD, complete_and_route, ingest, make_runner, make_settings, make_store
from web_testing import write_phantom_study as write_study

from dicomnode.domain import DeliveryOutcome, JobState

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "web"


def _require_browser() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("playwright is not installed")
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return sync_playwright


@dataclass
class Live:
    url: str
    settings: Any
    store: Any
    app: Any
    runner: Any
    study: Any
    job_id: int


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    import uvicorn

    from dicomnode.web.app import create_app

    tmp = tmp_path_factory.mktemp("webui")
    settings = make_settings(tmp / "data")
    store = make_store(settings)
    mp = pytest.MonkeyPatch()
    mp.setenv("DICOMNODE_ADMIN_PASSWORD", ADMIN_PASSWORD)  # read by create_app at start, not at import
    try:
        app = create_app(settings, store, role="serve")
    finally:
        mp.undo()
    study = write_study(tmp / "study", matrix=112)
    assert ingest(settings, store, study.files) == len(study.files)
    runner = make_runner(settings, store, app.state.web.rules.select)  # the real analysis step
    (job_id,) = complete_and_route(runner)
    assert runner.run_next_job("browser-test-worker") == job_id
    assert store.get_job(job_id).state is JobState.FAILED  # analysed and reported; the delivery failed

    config = uvicorn.Config(
        app, host="127.0.0.1", port=settings.http.port, log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield Live(f"http://127.0.0.1:{settings.http.port}", settings, store, app, runner, study, job_id)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        store.close()


@pytest.fixture(scope="module")
def page(live: Live) -> Iterator[Any]:
    sync_playwright = _require_browser()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        context = browser.new_context(viewport={"width": 1440, "height": 900})
        pg = context.new_page()
        pg.on("dialog", lambda d: d.accept())  # the confirm() of the action buttons
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.set_default_timeout(20_000)
        try:
            yield pg
        finally:
            context.close()
            browser.close()
        assert errors == [], f"JavaScript errors: {errors}"


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _series_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def test_01_login(page: Any, live: Live) -> None:
    page.goto(live.url + "/rules")
    assert "/login" in page.url
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", "not-the-password")
    page.click("button[type=submit]")
    page.wait_for_selector(".alert-bad")
    assert "Wrong user name or password" in page.inner_text(".alert-bad")
    shot(page, "01-login-error")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", ADMIN_PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(live.url + "/rules")
    assert page.inner_text(".username") == "admin"


def test_02_dashboard_and_studies(page: Any, live: Live) -> None:
    page.goto(live.url + "/")
    assert page.inner_text("h1") == "Dashboard"
    assert "jobs failed" in page.inner_text(".tiles")
    shot(page, "02-dashboard")
    page.click("nav.mainnav >> text=Studies & jobs")
    page.wait_for_selector("table.table tbody tr")
    shot(page, "03-studies")
    page.click(f"a[href='/studies/{live.study.study_uid}']")
    rows = page.locator("table.table").first.locator("tbody tr")
    assert rows.count() == 3
    selected = page.locator("tr.row-selected")
    assert selected.count() == 1 and "STANDARD" in selected.inner_text()
    shot(page, "04-study")
    page.goto(live.url + "/jobs")
    shot(page, "05-jobs")


def test_03_rule_with_a_mistake_shows_the_error_and_saves_nothing(page: Any, live: Live) -> None:
    page.goto(live.url + "/rules")
    page.wait_for_selector("#rules-status.ok")
    editor = page.locator("#rules-text")
    text = editor.input_value()
    assert "attribute: BodyPartExamined\n" in text
    editor.fill(text.replace("attribute: BodyPartExamined\n", "attribute: BodyPartExamine\n"))
    page.wait_for_selector("#rules-status.bad")
    problem = page.inner_text("#rules-problems li")
    assert "abdominal-ct-bmd" in problem and "condition" in problem and "BodyPartExamine" in problem
    assert page.locator("#rules-save").is_disabled()
    shot(page, "06-rules-error")
    assert live.store.latest_rule_version() is None  # nothing saved


def test_04_dry_run_marks_the_soft_series_then_save(page: Any, live: Live) -> None:
    editor = page.locator("#rules-text")
    fixed = editor.input_value().replace("attribute: BodyPartExamine\n", "attribute: BodyPartExamined\n")
    # A real edit: only series up to 4 mm qualify now.
    fixed = fixed.replace(
        "{attribute: derived.slice_mm, range: {max: 5}}", "{attribute: SliceThickness, range: {max: 4}}"
    )
    editor.fill(fixed)
    page.wait_for_selector("#rules-status.ok")
    page.select_option("#dry-study", live.study.study_uid)
    page.click("#dry-run")
    page.wait_for_selector(".dry-series")
    cards = page.locator(".dry-series")
    assert cards.count() == 3
    chosen = page.locator(".dry-series[data-selected=true]")
    assert chosen.count() == 1
    assert chosen.get_attribute("data-series") == _series_uid(live.study.soft[0])
    for i in range(3):
        assert cards.nth(i).locator(".reasons li").count() > 0  # every series says why
    bone = page.locator(f".dry-series[data-series='{_series_uid(live.study.bone[0])}']")
    bone.locator("summary").click()
    assert "SliceThickness" in bone.inner_text() and "FAIL" in bone.inner_text()
    shot(page, "07-rules-dry-run")

    page.fill("#rules-comment", "bone series above 4 mm no longer qualify")
    page.click("#rules-save")
    page.wait_for_selector("tr.row-selected >> text=in force")
    v = live.store.latest_rule_version()
    assert v is not None and v.author == "admin" and "range: {max: 4}" in v.yaml_text
    assert v.comment == "bone series above 4 mm no longer qualify"
    assert live.app.state.web.rules.current().version == v.id  # applies without a restart
    shot(page, "08-rules-saved")
    page.click("text=diff vs base")
    page.wait_for_selector("pre.diff .add")
    assert "max: 4" in page.inner_text("pre.diff .add")
    shot(page, "09-rules-diff")


def test_05_job_page_and_rerun(page: Any, live: Live) -> None:
    page.goto(f"{live.url}/jobs/{live.job_id}")
    assert "failed" in page.inner_text("h1").lower()
    imgs = page.locator(".overlays img")
    assert imgs.count() >= 1
    page.wait_for_function(
        "() => [...document.querySelectorAll('.overlays img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    assert "vBMD" in page.inner_text(".tiles-result")
    assert "delivery to pacs failed" in page.inner_text(".alert-bad")
    shot(page, "10-job-failed")
    page.click("#rerun")
    page.wait_for_selector("h1 .badge.st-wait")
    job = live.store.get_job(live.job_id)
    assert job.state is JobState.PENDING
    assert live.store.job_detail(live.job_id).events[-1].actor == "admin"
    shot(page, "11-job-rerun")


def test_06_resend_failed_delivery(page: Any, live: Live) -> None:
    import requests

    # While the re-run job waits for its new analysis, its old delivery cannot be resent (the old result
    # would go out); once analysed again, its delivery is re-opened and (closed port) fails again.
    (old,) = live.store.list_deliveries(job_id=live.job_id).items
    r = requests.post(
        f"{live.url}/api/deliveries/{old.id}/resend", auth=("admin", ADMIN_PASSWORD), timeout=10
    )
    assert r.status_code == 409
    assert live.runner.run_next_job("browser-test-worker") == live.job_id
    assert live.store.get_job(live.job_id).state is JobState.FAILED
    page.goto(live.url + "/deliveries?outcome=permanent_failure")
    rows = page.locator("table.table").nth(1).locator("tbody tr")
    assert rows.count() == 1
    assert "cannot connect" in rows.first.inner_text()
    shot(page, "12-deliveries-failed")
    (delivery,) = live.store.list_deliveries(outcome=DeliveryOutcome.PERMANENT_FAILURE).items
    rows.first.locator("button", has_text="Resend").click()
    page.wait_for_selector("table.table >> nth=1 >> text=No deliveries with outcome permanent failure")
    assert live.store.get_delivery(delivery.id).outcome is DeliveryOutcome.PENDING
    page.goto(live.url + "/deliveries")
    shot(page, "13-deliveries-after-resend")


def test_07_audit_health_users(page: Any, live: Live) -> None:
    page.goto(live.url + "/audit")
    text = page.inner_text("table.table")
    for action in ("rules.save", "job.rerun", "delivery.resend", "login"):
        assert action in text
    shot(page, "14-audit")
    page.goto(live.url + "/health")
    page.wait_for_selector("#ready-table .badge")
    page.wait_for_selector("#metrics-table code")
    assert "dicomnode_jobs" in page.inner_text("#metrics-table")
    shot(page, "15-health")
    page.goto(live.url + "/users")
    shot(page, "16-users")
