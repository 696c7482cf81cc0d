"""The admin pages in a real headless Chromium (Playwright driving the system browser).

Screenshots are saved under test-artifacts/ for people to look at.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from db.models import Dispatch
from devkit.synth import generate_study
from tests.conftest import storescu, wait_until
from tests.web_helpers import PASSWORD, failed_job, make_users, modelless_settings

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    exe = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(exe).exists():
        pytest.fail("chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _login(page, base: str, username: str = "ada") -> None:
    page.goto(f"{base}/")
    assert "/login" in page.url
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/")


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_admin_retries_a_failed_job_from_the_study_page(tmp_path, start_node, browser):
    node = start_node(**modelless_settings(tmp_path))
    make_users(node)
    job_id = failed_job(node, "1.2.826.0.1.3680043.10.1.7")
    base = f"http://127.0.0.1:{node.web_port}"
    page = browser.new_page()
    try:
        _login(page, base)
        _shot(page, "dashboard")
        page.goto(f"{base}/studies")
        page.click("text=ACC1")
        row = page.locator(f"#job-{job_id}")
        assert row.locator(".job-state").inner_text() == "failed"
        _shot(page, "study-failed-job")
        row.locator("button", has_text="Retry").click()
        page.wait_for_load_state()
        assert page.locator("#msg").inner_text() == f"job {job_id} queued again"
        assert page.locator(f"#job-{job_id} .job-state").inner_text() == "queued"
        _shot(page, "study-job-retried")
    finally:
        page.close()


def test_study_through_the_whole_chain_shows_timeline_and_preview(
    tmp_path, orthanc, start_node, browser
):
    if not (REPO / "models" / "tumor").is_dir():
        pytest.fail("the shipped tumor model (models/tumor) is missing; the chain cannot run")
    node = start_node(
        destinations=[
            {
                "name": "pacs",
                "ae_title": orthanc.aet,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
            }
        ]
    )
    make_users(node)
    study = generate_study(
        tmp_path / "study", seed=21, phases="P", rows=192, columns=192, pixel_spacing_mm=2.0
    )
    assert storescu(study.series[0].files, node.settings.port).returncode == 0

    def sent() -> bool:
        with node.db.session() as s:
            return s.scalars(select(Dispatch).where(Dispatch.state == "sent")).first() is not None

    wait_until(sent, 240, "the SEG sent to Orthanc")
    base = f"http://127.0.0.1:{node.web_port}"
    page = browser.new_page()
    try:
        _login(page, base)
        page.goto(f"{base}/studies/{study.study_uid}")
        steps = page.locator("#timeline li")
        assert steps.count() == 6
        assert page.locator("#timeline li.missing").count() == 0  # every step happened
        img = page.locator("img.preview").first
        img.wait_for()
        page.wait_for_function("() => document.querySelector('img.preview').naturalWidth > 0")
        assert page.evaluate("document.querySelector('img.preview').naturalWidth") == 192
        _shot(page, "study-whole-chain")
    finally:
        page.close()
