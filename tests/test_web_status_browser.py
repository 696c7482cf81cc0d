"""What the pages say at a glance, in headless Chromium against a running node.

One node (no model runs: worker off), the shipped rules, a four-phase demo study and a
study with only a coronal portal venous series (no accession number). Checks: no rule
matched with the failing condition, the dry run agreeing with the live node and
``route explain`` for every demo series, page titles, node identity, local times, and the
layouts at 1280, 800 and 390 px (every menu entry reachable).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from db.models import Series
from devkit.synth import generate_study
from dicom_node.explain import explain
from dicom_node.rules import load_rules
from dicom_node.service import Node
from tests.browser_helpers import launch, login, page_width_overflow, shot
from tests.conftest import node_settings, storescu, wait_until
from tests.variants import coronal_reformat, rewrite
from tests.web_helpers import make_users

SMALL = {"rows": 64, "columns": 64, "pixel_spacing_mm": 6.0, "slices": 12}
MENU = ["Dashboard", "Studies", "Queue", "Rules", "Destinations"]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("status-pages")
    node = Node(
        node_settings(tmp, worker={"enabled": False}, time_zone="Asia/Seoul"), stop_grace_s=10
    ).start()
    try:
        make_users(node)
        demo = generate_study(tmp / "demo", seed=7, phases="NAPD", **SMALL)
        portal = generate_study(tmp / "portal", seed=8, phases="P", **SMALL).series[0]
        mpr = coronal_reformat(portal.files, tmp / "mpr", "COR PORTAL VENOUS")
        coronal_study = generate_uid()

        def own_study(_index: int, ds: pydicom.Dataset) -> None:
            ds.StudyInstanceUID = coronal_study
            del ds.AccessionNumber  # a study without one is headed by what it is

        coronal = rewrite(mpr, tmp / "coronal", own_study)
        for files in [s.files for s in demo.series] + [coronal]:
            assert storescu(files, node.settings.port).returncode == 0
        wait_until(lambda: _routed(node) == 5, 60, "the five series routed")
        yield {"node": node, "demo": demo, "coronal": coronal_study, "tmp": tmp}
    finally:
        node.stop()


def _routed(node: Node) -> int:
    with node.db.session() as s:
        return len(s.scalars(select(Series).where(Series.routed_at.is_not(None))).all())


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = launch(pw)
        yield b
        b.close()


@pytest.fixture
def page(site: dict[str, Any], browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    p = context.new_page()
    login(p, _base(site), "vic")  # a viewer sees everything the checks need
    yield p
    context.close()


def _base(site: dict[str, Any]) -> str:
    return f"http://127.0.0.1:{site['node'].web_port}"


def test_a_coronal_only_study_says_no_rule_matched_and_why(site, page):
    base = _base(site)
    page.goto(f"{base}/studies")
    row = page.locator(f"tr[data-study='{site['coronal']}']")
    assert row.locator(".badge").inner_text() == "no rule matched"
    assert "Orientation coronal is not axial" in row.locator(".reason").inner_text()
    row.locator("a").click()
    page.wait_for_load_state()
    status = page.locator("#study-status").inner_text()
    assert status == "no rule matched: Orientation coronal is not axial", status
    heading = page.locator("#study-heading").inner_text()
    assert heading == "CT ABDOMEN KIDNEY 4 PHASE 2024-03-15", heading  # not a bare "Study"
    assert page.title() == f"{heading} · DICOM_NODE · dicom-node"
    rule = page.locator("#series td.rule").inner_text()
    assert rule == "no rule matched: contrast-ct-kidney: Orientation coronal is not axial"
    # Times are local (Asia/Seoul here), to the second, without the ISO 'T' or microseconds.
    times = page.locator("#events tr td:first-child").all_inner_texts()
    assert times and all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", t) for t in times)
    assert "Asia/Seoul (KST)" in page.locator("footer").inner_text()
    # Events name their series.
    complete = page.locator("#events tr", has_text="series_complete").first.inner_text()
    assert "series 40 COR PORTAL VENOUS" in complete
    shot(page, "status-no-rule-matched")


def test_the_dry_run_agrees_with_the_live_node_and_route_explain(site, page):
    base, node, demo = _base(site), site["node"], site["demo"]
    explained = {
        i["series_uid"]: i
        for i in explain(
            load_rules(node.settings.rules_file), [site["tmp"] / "demo"], node.pipeline_spacing_mm
        )
    }
    page.goto(f"{base}/studies/{demo.study_uid}")
    live = {}
    for series in demo.series:
        row = page.locator(f"#series tr[data-series='{series.series_uid}']")
        cells = row.locator("td")
        feeds = row.locator(".feeds")
        live[series.series_uid] = {
            "phase": cells.nth(4).inner_text().split(" ")[0],
            "rule": cells.nth(6).inner_text().splitlines()[0],
            "pipelines": feeds.inner_text().removeprefix("feeds ") if feeds.count() else "",
        }
    for series in demo.series:
        page.goto(f"{base}/rules")
        page.fill("#dry-run input[name=series_uid]", series.series_uid)
        page.click("#dry-run button")
        page.wait_for_load_state()
        row = page.locator(f"#dry-run-series tr[data-series='{series.series_uid}']")
        dry = {
            "phase": row.locator(".phase").inner_text().split(" ")[0],
            "rule": row.locator(".rule").inner_text(),
            "pipelines": row.locator(".pipelines").inner_text(),
        }
        item = explained[series.series_uid]
        cli = {
            "phase": item["phase"],
            "rule": item["rule"] or "no rule matched: " + "; ".join(item["not_matched"]),
            "pipelines": ", ".join(item["pipelines"]),
        }
        assert dry == live[series.series_uid] == cli, (series.phase, dry, live, cli)
        assert page.locator("#dry-run-json").count() == 1  # raw JSON behind a toggle
        assert not page.locator("#dry-run-json").is_visible()
    assert {d["phase"] for d in live.values()} == {"N", "A", "P", "D"}
    assert live[demo.by_phase("P").series_uid]["pipelines"] == "tumor, vessel"
    shot(page, "status-dry-run")


@pytest.mark.parametrize("width", [1280, 800, 390])
def test_pages_fit_the_width_and_name_the_node_and_page(site, page, width):
    base, node, demo = _base(site), site["node"], site["demo"]
    page.set_viewport_size({"width": width, "height": 900})
    pages = {
        "/": "Dashboard",
        "/studies": "Studies",
        f"/studies/{demo.study_uid}": f"Accession {demo.accession}",
        f"/rules?series_uid={demo.series[0].series_uid}": "Rules",
        "/queue": "Queue",
        "/destinations": "Destinations",
    }
    for path, title in pages.items():
        page.goto(base + path)
        assert page_width_overflow(page) <= 0, (width, path, page_width_overflow(page))
        assert page.title() == f"{title} · DICOM_NODE · dicom-node", page.title()
        identity = page.locator("#node-identity").inner_text()
        assert f"DICOM_NODE · port {node.settings.port} · v" in identity
        for label in MENU:
            link = page.locator("#menu a", has_text=label)
            box = link.bounding_box()
            assert link.is_visible() and box and box["x"] >= 0 and box["x"] + box["width"] <= width
        logout = page.locator("#menu button", has_text="Log out")
        box = logout.bounding_box()
        assert logout.is_visible() and box["x"] + box["width"] <= width
    page.goto(f"{base}/studies/{demo.study_uid}")
    shot(page, f"layout-{width}-study")
    if width == 390:
        page.locator("#menu a", has_text="Destinations").click()
        page.wait_for_url(f"{base}/destinations")
        shot(page, "layout-390-menu")
