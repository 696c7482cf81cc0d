"""Review before sending, the result viewer, a PACS that goes down, and run timelines, in
headless Chromium against a running node that segments with the shipped tumour model and
sends to a real Orthanc.

One node, one study, in order: the results are held (nothing in Orthanc); the viewer
opens on the tumour in the colour models.yaml gives it; with Orthanc stopped a reviewer
approves the SEG (delivery pending, red banner, /healthz degraded) and rejects the
RTSTRUCT with a reason; Orthanc back: the SEG is delivered, the banner goes, the RTSTRUCT
never arrives; an admin retries the job and resends the SEG: the timeline shows two runs.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from db.models import Dispatch, Event, Job, Result
from devkit.net import free_port
from devkit.orthanc import OrthancServer
from devkit.synth import generate_study
from dicom_node.service import Node
from dicom_node.web.users import add_user
from inference.registry import load_registry
from kernel.settings import REPO_ROOT
from tests.browser_helpers import launch, login, shot
from tests.conftest import node_settings, storescu, wait_until
from tests.web_helpers import PASSWORD, make_users

pytestmark = pytest.mark.slow
REASON = "contours too coarse for the report"


def _model_colours() -> dict[str, tuple[int, int, int]]:
    spec = load_registry(REPO_ROOT / "models.yaml", check_folders=False).models["tumor"]
    return {label.name: tuple(label.color) for label in spec.labels.values()}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if not (REPO_ROOT / "models" / "tumor").is_dir():
        pytest.fail("the shipped tumor model (models/tumor) is missing")
    tmp = tmp_path_factory.mktemp("review")
    orthanc = OrthancServer(
        tmp / "orthanc", aet="ORTHANC", dicom_port=free_port(), http_port=free_port()
    ).start()
    pacs = {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}
    node = Node(
        node_settings(
            tmp,
            destinations=[
                {"name": "pacs", **pacs, "review": "required"},
                {"name": "pacs-rt", **pacs, "result_type": "RTSTRUCT", "review": "required"},
            ],
            health={"echo_interval_s": 1},
        ),
        stop_grace_s=10,
    ).start()
    try:
        make_users(node)
        add_user(node.db, "rita", PASSWORD, "reviewer")
        study = generate_study(
            tmp / "study", seed=21, phases="P", rows=192, columns=192, pixel_spacing_mm=2.0
        )
        assert storescu(study.series[0].files, node.settings.port).returncode == 0
        wait_until(lambda: len(_events(node, "result_held")) == 2, 240, "both results held")
        yield {"node": node, "orthanc": orthanc, "study": study}
    finally:
        node.stop()
        orthanc.stop(graceful=False)  # its storage is thrown away


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = launch(pw)
        yield b
        b.close()


def _page(site: dict[str, Any], browser: Any, user: str) -> Any:
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    login(page, _base(site), user)
    return page


def _base(site: dict[str, Any]) -> str:
    return f"http://127.0.0.1:{site['node'].web_port}"


def _events(node: Node, kind: str) -> list[Event]:
    with node.db.session() as s:
        return list(s.scalars(select(Event).where(Event.kind == kind).order_by(Event.id)))


def _results(node: Node) -> dict[str, Result]:
    with node.db.session() as s:
        return {r.result_type: r for r in s.scalars(select(Result))}


def _sends(node: Node) -> dict[str, Dispatch]:
    with node.db.session() as s:
        return {d.destination: d for d in s.scalars(select(Dispatch))}


def _pixels_near(png: bytes, rgb: tuple[int, int, int], tolerance: int = 3) -> int:
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int((np.abs(image - np.array(rgb)).max(axis=2) <= tolerance).sum())


def test_held_results_and_the_viewer_shows_the_tumour_in_its_colour(site, browser):
    node, orthanc, study = site["node"], site["orthanc"], site["study"]
    assert {d: s.state for d, s in _sends(node).items()} == {"pacs": "held", "pacs-rt": "held"}
    assert orthanc.count_instances() == 0  # nothing leaves before a reviewer decides
    colours = _model_colours()
    page = _page(site, browser, "rita")
    try:
        page.goto(f"{_base(site)}/studies/{study.study_uid}")
        assert page.locator("#study-status .badge").inner_text() == "held for review"
        shot(page, "review-study-held")
        for kind in ("BINARY", "RTSTRUCT"):
            result = _results(node)[kind]
            page.goto(f"{_base(site)}/results/{result.id}")
            assert "Held for review" in page.locator("#review-banner").inner_text()
            legend = {
                row.get_attribute("data-label"): row
                for row in page.locator("#legend tr[data-label]").all()
            }
            assert set(legend) == {"kidney", "kidney tumor"}
            tumour = legend["kidney tumor"]
            volume = float(tumour.locator("td.num").inner_text().removesuffix(" mL"))
            assert 1 < volume < float(legend["kidney"].locator("td.num").inner_text()[:-3])
            swatch = tumour.locator(".swatch").get_attribute("data-rgb")
            assert tuple(int(v) for v in swatch.split(",")) == colours["kidney tumor"]
            # The viewer opens on the tumour's largest slice, drawn in the PACS colours.
            default = page.locator("#viewer").get_attribute("data-default")
            assert tumour.locator("button.goto").get_attribute("data-slice") == default
            page.wait_for_function("document.getElementById('slice').complete")
            image = page.locator("#slice").screenshot()
            assert _pixels_near(image, colours["kidney tumor"]) >= 8, kind
            assert _pixels_near(image, colours["kidney"]) >= 8, kind
            shot(page, f"review-viewer-tumour-{kind.lower()}")
            page.uncheck("#overlay")  # the overlay toggle: the CT alone
            page.wait_for_function(
                "document.getElementById('slice').src.includes('overlay=0')"
                " && document.getElementById('slice').complete"
            )
            assert _pixels_near(page.locator("#slice").screenshot(), colours["kidney tumor"]) == 0
            page.press("body", "ArrowDown")  # scrolls through the source series
            assert (
                page.locator("#slice-label").inner_text().startswith(f"slice {int(default) + 2} ")
            )
    finally:
        page.context.close()


def test_pacs_down_then_back_with_one_result_approved_and_one_rejected(site, browser):
    node, orthanc, study = site["node"], site["orthanc"], site["study"]
    results = _results(node)
    orthanc.stop()
    page = _page(site, browser, "rita")
    try:
        base = _base(site)
        page.goto(f"{base}/results/{results['BINARY'].id}")
        page.click("#approve")
        page.wait_for_load_state()
        assert "approved" in page.locator("#msg").inner_text()
        page.goto(f"{base}/results/{results['RTSTRUCT'].id}")
        page.fill("form.reject input[name=reason]", REASON)
        page.click("#reject")
        page.wait_for_load_state()
        assert "rejected" in page.locator("#msg").inner_text()
        wait_until(lambda: _sends(node)["pacs"].attempts >= 1, 30, "a send attempt to the PACS")

        page.goto(f"{base}/")
        banner = page.locator("#alert-banner")
        assert banner.is_visible() and "Destination pacs (ORTHANC) unreachable" in (
            banner.inner_text()
        )
        assert page.locator("#problems").inner_text().count("destination_down") >= 1
        shot(page, "status-pacs-down-dashboard")
        page.goto(f"{base}/studies/{study.study_uid}")
        assert page.locator("#study-status .badge").inner_text() == "delivery pending"
        assert "pacs unreachable since" in page.locator("#study-status").inner_text()
        sends = page.locator("#sends").inner_text()
        assert "tumor SEG on series" in sends and "rejected by rita" in sends and REASON in sends
        shot(page, "status-pacs-down-study")
        health = page.request.get(f"{base}/healthz")
        assert health.status == 200 and health.json()["status"] == "degraded"
        assert any("destination pacs unreachable" in r for r in health.json()["reasons"])
        assert page.request.get(f"{base}/readyz").status == 200  # it still takes studies

        orthanc.start()
        seg_sop = results["BINARY"].sop_uid
        orthanc.wait_for_instance(seg_sop, 60)  # resumed as soon as it answers a C-ECHO

        def banner_gone() -> bool:
            page.goto(f"{base}/")
            return page.locator("#alert-banner").count() == 0

        wait_until(banner_gone, 30, "the banner gone")
        shot(page, "status-pacs-back-dashboard")
        assert page.request.get(f"{base}/healthz").json()["status"] == "ok"
        page.goto(f"{base}/studies/{study.study_uid}")
        # The study waits for the arterial and delayed phases vessel and ureter need; the
        # tumour pipeline got its SEG through and its RTSTRUCT was rejected.
        status = page.locator("#study-status").inner_text()
        none = "series; none received yet; if none arrives it does not run when the study "
        settles = r"settles at [0-9: -]+ \(study_timeout_s \d+ s\)"
        assert re.fullmatch(
            rf"waiting for inputs: vessel: waiting for an arterial \(A\) {none}{settles}; "
            rf"ureter: waiting for a delayed \(D\) {none}{settles}",
            status,
        ), status
        item = page.locator("#items tr[data-item='tumor']")
        assert item.locator(".badge").inner_text() == "partially delivered"
        assert "delivered SEG to pacs" in item.inner_text()
        assert f"RTSTRUCT to pacs-rt rejected by rita: {REASON}" in item.inner_text()
        assert orthanc.find_instance(results["RTSTRUCT"].sop_uid) is None
        shot(page, "status-pacs-back-study")
    finally:
        page.context.close()
        if not orthanc.is_running():
            orthanc.start()


def test_retry_and_resend_show_two_runs_without_a_negative_step(site, browser):
    node, study = site["node"], site["study"]
    with node.db.session() as s:
        job_id = s.scalars(select(Job.id)).one()
    page = _page(site, browser, "ada")  # an admin retries and resends, and may review too
    try:
        base = _base(site)
        page.goto(f"{base}/studies/{study.study_uid}")
        page.locator(f"#job-{job_id} button", has_text="Retry").click()
        page.wait_for_load_state()
        wait_until(lambda: len(_events(node, "result_held")) == 4, 120, "the re-run held")
        page.goto(f"{base}/results/{_results(node)['BINARY'].id}")
        page.click("#approve")
        page.wait_for_load_state()
        wait_until(lambda: len(_events(node, "sent")) == 2, 60, "the re-run's SEG sent")
        page.goto(f"{base}/studies/{study.study_uid}")
        seg_row = _sends(node)["pacs"].id
        page.locator(f"#sends tr[data-dispatch='{seg_row}'] button", has_text="Resend").click()
        page.wait_for_load_state()
        wait_until(lambda: len(_events(node, "sent")) == 3, 60, "the resend delivered")
        page.goto(f"{base}/studies/{study.study_uid}")
        runs = page.locator(f"#runs section.run[data-job='{job_id}']")
        assert runs.count() == 2
        steps = [[c.inner_text() for c in run.locator("td.step").all()] for run in runs.all()]
        assert steps[0][0] == "received" and "approved" in steps[0] and "sent" in steps[0]
        assert steps[1][0] == "retry" and steps[1][-2:] == ["resend", "sent"], steps[1]
        assert {"started", "inferred", "held for review", "approved"} <= set(steps[1])
        for after in page.locator("#runs td.after").all_inner_texts():
            assert after == "" or (after.startswith("+") and not after.startswith("+-")), after
        totals = page.locator("#runs .total").all_inner_texts()
        assert len(totals) >= 2 and all(t.startswith("total ") for t in totals)
        for step in page.locator("#timeline li").all():
            assert "+-" not in step.inner_text()
        shot(page, "timeline-two-runs")
    finally:
        page.context.close()
