"""The preview of a result whose source series is damaged on disk (issue 13, kind 9):
409 with the reason naming the instance, not a 500."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from sqlalchemy import select

from db.models import Instance, Job, Result, Study
from devkit.synth import generate_study
from inference import queue
from inference.labels import ANATOMICAL_STRUCTURE, SegmentLabel
from inference.results import SEG_SOP_CLASS_UID, Algorithm
from inference.seg_writer import write_seg
from kernel.uids import derived_uid
from tests.conftest import storescu, wait_until
from tests.test_seg_writer import KIDNEY
from tests.web_helpers import client_for, make_users, modelless_settings


def test_preview_of_a_result_on_a_damaged_source_answers_409(tmp_path, start_node):
    node = start_node(**modelless_settings(tmp_path))
    token = make_users(node)
    study = generate_study(
        tmp_path / "study", seed=32, phases="P", rows=48, columns=48, pixel_spacing_mm=8.0,
        slices=6,
    )  # fmt: skip
    series = study.series[0]
    assert storescu(series.files, node.settings.port).returncode == 0
    wait_until(lambda: _instances(node) == 6, 30, "the series stored")

    # A result on it, as a job would have recorded it.
    sources = sorted(
        (pydicom.dcmread(f) for f in series.files), key=lambda d: float(d.ImagePositionPatient[2])
    )
    labels = np.zeros((6, 48, 48), np.uint8)
    labels[3, 10:30, 10:30] = 1
    seg_path = tmp_path / "seg.dcm"
    sop_uid = derived_uid("damaged-preview-sop")
    write_seg(
        sources,
        labels,
        [SegmentLabel(1, "kidney", ANATOMICAL_STRUCTURE, KIDNEY, (255, 0, 0))],
        path=seg_path,
        algorithm=Algorithm(name="test", version="1"),
        series_instance_uid=derived_uid("damaged-preview-series"),
        sop_instance_uid=sop_uid,
        series_number=99,
        series_description="test SEG",
    )
    with node.db.session() as s:
        row = s.scalars(select(Study)).one()
        job_id = queue.enqueue(s, row, "tumor", {"image": series.series_uid}).id
    assert queue.claim(node.db, "test-worker", "cpu").id == job_id

    def record(s, job: Job) -> None:
        s.add(
            Result(job_id=job.id, study_id=job.study_id, kind="SEG", sop_uid=sop_uid,
                   series_uid=derived_uid("damaged-preview-series"),
                   sop_class_uid=SEG_SOP_CLASS_UID, source_series_uid=series.series_uid,
                   path=str(seg_path), pipeline="tumor", result_type="BINARY")
        )  # fmt: skip

    assert queue.finish(node.db, job_id, {}, record=record) == "done"
    with node.db.session() as s:
        result_id = s.scalars(select(Result)).one().id
        spooled = {i.sop_uid: Path(i.path) for i in s.scalars(select(Instance))}

    # One source slice on disk loses its last rows: the preview is refused with the reason.
    victim = spooled[str(sources[3].SOPInstanceUID)]
    intact = victim.read_bytes()
    ds = pydicom.dcmread(victim)
    ds.PixelData = ds.PixelData[: -48 * 2 * 4]
    ds.save_as(victim)
    client = client_for(node)
    auth = {"Authorization": f"Bearer {token}"}
    r = client.get(f"/api/results/{result_id}/preview.png", headers=auth)
    assert r.status_code == 409, r.text
    detail = r.json()["detail"]
    assert str(sources[3].SOPInstanceUID) in detail and "short by 384" in detail
    assert str(victim) in detail

    # The same slice intact again: the preview is drawn.
    victim.write_bytes(intact)
    r = client.get(f"/api/results/{result_id}/preview.png", headers=auth)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"


def _instances(node) -> int:
    with node.db.session() as s:
        return len(s.scalars(select(Instance)).all())
