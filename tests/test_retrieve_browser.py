"""Pull on demand end to end, in headless Chromium: a study placed in Orthanc first is
found by its accession number with the studies page's form, retrieved by C-MOVE with the
tumour pipeline picked on the Retrieve page, segmented by the shipped tumour model, and
its SEG arrives in Orthanc (the PACS it came from)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from db.models import Dispatch, Job, Result
from devkit.net import free_port
from devkit.synth import generate_study
from dicom_node.service import Node
from kernel.settings import REPO_ROOT
from tests.browser_helpers import launch, login, shot
from tests.conftest import node_settings, wait_until
from tests.test_retrieve import dicomweb_orthanc
from tests.web_helpers import make_users


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = launch(pw)
        yield b
        b.close()


def test_a_study_in_the_pacs_is_retrieved_from_the_web_form_and_its_seg_arrives(tmp_path, browser):
    if not (REPO_ROOT / "models" / "tumor").is_dir():
        pytest.fail("the shipped tumor model (models/tumor) is missing; the chain cannot run")
    node_port = free_port()
    pacs = dicomweb_orthanc(tmp_path / "orthanc", "DICOM_NODE", node_port)
    node = None
    try:
        study = generate_study(
            tmp_path / "study", seed=51, phases="P", rows=192, columns=192, pixel_spacing_mm=2.0
        )
        for path in study.series[0].files:
            pacs.upload(path.read_bytes())
        accession = str(pydicom.dcmread(study.series[0].files[0]).AccessionNumber)
        where = {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}
        node = Node(
            node_settings(
                tmp_path,
                port=node_port,
                destinations=[{"name": "pacs", **where}],
                sources=[{"kind": "dimse", "name": "pacs", **where}],
            ),
            stop_grace_s=10,
        ).start()
        make_users(node)
        base = f"http://127.0.0.1:{node.web_port}"
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        login(page, base, "ada")
        page.goto(f"{base}/studies")
        form = page.locator("#retrieve-search")
        form.locator("select[name=source]").select_option("pacs")
        form.locator("input[name=accession_number]").fill(accession)
        form.locator("button").click()
        page.wait_for_url(f"{base}/retrieve?*")
        found = page.locator(f"#found tr[data-study='{study.study_uid}']")
        assert found.locator("input[type=radio]").is_checked()  # the one match, picked
        assert "no" in found.inner_text()  # not in this node yet
        page.check("#retrieve-pipelines input[value=tumor]")
        shot(page, "retrieve-found")
        page.click("#retrieve-button")
        page.wait_for_url(f"{base}/retrieve?msg=*")
        assert f"study {study.study_uid} asked for from pacs; pipelines: tumor" in (
            page.locator("#msg").inner_text()
        )
        row = page.locator("#retrievals tr[data-retrieve]").first
        # The page refreshes itself while the retrieval runs.
        row.locator(".retrieve-state", has_text="received").wait_for(timeout=30_000)
        progress = row.locator(".progress").inner_text()
        assert progress.startswith(f"{len(study.series[0].files)} / {len(study.series[0].files)}")
        shot(page, "retrieve-received")

        def sent() -> Dispatch | None:
            with node.db.session() as s:
                return s.scalars(select(Dispatch).where(Dispatch.state == "sent")).first()

        dispatch = wait_until(sent, 240, "the tumour SEG sent to Orthanc")
        instance = pacs.find_instance(dispatch.sop_uid)
        assert instance is not None
        tags = pacs.instance_tags(instance)
        assert tags["Modality"] == "SEG"
        assert tags["StudyInstanceUID"] == study.study_uid
        with node.db.session() as s:
            assert [j.pipeline for j in s.scalars(select(Job))] == ["tumor"]
            result = s.scalars(select(Result)).one()
            assert result.source_series_uid == study.series[0].series_uid
        page.goto(f"{base}/studies/{study.study_uid}")
        retrieved = page.locator("#study-retrievals tr[data-retrieve]").first
        assert retrieved.locator(".retrieve-state").inner_text() == "received"
        assert "tumor" in retrieved.inner_text()
        shot(page, "retrieve-study-page")
        page.close()
    finally:
        if node is not None:
            node.stop()
        pacs.stop(graceful=False)  # its storage is thrown away
