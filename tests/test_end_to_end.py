"""The whole chain on real components.

DCMTK storescu -> node SCP -> spool -> assembler -> routing -> queue -> nnU-Net worker ->
highdicom SEG -> C-STORE -> a real Orthanc, then the SEG is fetched back over Orthanc's
REST API and checked voxel by voxel.
"""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pytest
import torch
from sqlalchemy import select

from db.models import Dispatch, Job, Series
from devkit import dciodvfy
from devkit.expect import expected_result_uids
from devkit.phantom import STRUCTURES
from devkit.synth import generate_study
from inference.engine import Engine
from inference.seg_reader import dice, seg_label_map
from inference.volume import load_series, sort_slices
from tests.conftest import storescu, wait_until

pytestmark = pytest.mark.slow


def test_study_sent_with_storescu_comes_back_as_seg_in_orthanc(tmp_path, orthanc, start_node):
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
    study = generate_study(
        tmp_path / "study", seed=11, rows=256, columns=256, pixel_spacing_mm=1.56
    )
    files = [f for series in study.series for f in series.files]
    proc = storescu(files, node.settings.port)
    assert proc.returncode == 0, proc.stderr

    portal = study.by_phase("P")
    _, seg_sop_uid, _ = expected_result_uids(node, "tumor", {"image": portal.files})
    instance_id = orthanc.wait_for_instance(seg_sop_uid, timeout_s=300)
    seg_bytes = orthanc.instance_file(instance_id)
    seg = hd.seg.segread(io.BytesIO(seg_bytes))

    # The label map in the PACS is voxel-exact what the model predicts on that series.
    volume = load_series(portal.files)
    engine = Engine(node.registry, torch.device("cpu"))
    predicted = engine.runner("tumor").predict(volume.array[None], volume.spacing_zyx)
    source_uids = [str(h.SOPInstanceUID) for h in volume.headers]
    numbers, names = seg_label_map(seg, source_uids)
    value_of = {"kidney": 1, "kidney tumor": 2}
    lut = np.zeros(256, np.uint8)
    for number, name in names.items():
        lut[number] = value_of[name]
    np.testing.assert_array_equal(lut[numbers], predicted)

    # ... and matches the phantom's truth.
    truth = portal.truth
    kidneys = np.isin(truth, [STRUCTURES["kidney_left"], STRUCTURES["kidney_right"]])
    assert dice(predicted == 1, kidneys) >= 0.9
    assert dice(predicted == 2, truth == STRUCTURES["kidney_tumor"]) >= 0.9

    # Every frame sits on a real source slice of the portal-venous series.
    position_of = {
        str(h.SOPInstanceUID): list(map(float, h.ImagePositionPatient)) for h in volume.headers
    }
    for frame in seg.PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert ref in position_of
        ipp = list(map(float, frame.PlanePositionSequence[0].ImagePositionPatient))
        assert ipp == position_of[ref]
    assert seg.FrameOfReferenceUID == volume.headers[0].FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == portal.series_uid

    seg_file = tmp_path / "seg.dcm"
    seg_file.write_bytes(seg_bytes)
    assert dciodvfy.validate_file(seg_file) == []

    # The vessel pipeline (A + P, output in A's geometry) and the ureter pipeline (D) ran
    # on the same study; each SEG is in its reference series' geometry.
    arterial, delayed = study.by_phase("A"), study.by_phase("D")
    vessel_inputs = {"A": arterial.files, "P": portal.files}
    vessel_sop_uid = _check_seg_in_pacs(orthanc, node, "vessel", arterial, vessel_inputs, {
        "kidney": ["kidney_left", "kidney_right"],
        "artery": ["aorta"],
        "vein": ["inferior_vena_cava"],
    })  # fmt: skip
    ureter_sop_uid = _check_seg_in_pacs(orthanc, node, "ureter", delayed, {"D": delayed.files}, {
        "ureter": ["ureter_left", "ureter_right"],
        "kidney": ["kidney_left", "kidney_right"],
    })  # fmt: skip

    # The database holds the whole story.
    with node.db.session() as s:
        jobs = s.scalars(select(Job).order_by(Job.pipeline)).all()
        assert [(j.pipeline, j.state, j.inputs) for j in jobs] == [
            ("tumor", "done", {"image": portal.series_uid}),
            ("ureter", "done", {"D": delayed.series_uid}),
            ("vessel", "done", {"A": arterial.series_uid, "P": portal.series_uid}),
        ]
        sends = s.scalars(select(Dispatch).order_by(Dispatch.sop_uid)).all()
        assert [(d.sop_uid, d.destination, d.state, d.last_status) for d in sends] == sorted(
            (uid, "pacs", "sent", 0) for uid in (seg_sop_uid, vessel_sop_uid, ureter_sop_uid)
        )
        series = s.scalars(select(Series)).all()
        assert {x.series_uid: x.instance_count for x in series} == {
            x.series_uid: len(x.files) for x in study.series
        }
        assert all(x.state == "complete" for x in series)


def _check_seg_in_pacs(orthanc, node, pipeline: str, reference, inputs, expected: dict) -> str:
    """The pipeline's SEG on ``reference`` is in the PACS, references that series and each
    named segment overlaps its phantom structures with Dice >= 0.9; returns its SOP UID."""
    _, sop_uid, _ = expected_result_uids(node, pipeline, inputs)
    seg = hd.seg.segread(io.BytesIO(orthanc.instance_file(orthanc.wait_for_instance(sop_uid, 300))))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == reference.series_uid
    _, headers = sort_slices(reference.files)  # headers only: the pixels are not needed
    numbers, names = seg_label_map(seg, [str(h.SOPInstanceUID) for h in headers])
    by_name = {name: number for number, name in names.items()}
    for name, structures in expected.items():
        truth = np.isin(reference.truth, [STRUCTURES[x] for x in structures])
        assert dice(numbers == by_name[name], truth) >= 0.9, (pipeline, name)
    return sop_uid


def test_rerun_replaces_the_seg_instead_of_adding_one(tmp_path, orthanc, start_node):
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
    study = generate_study(
        tmp_path / "study", seed=12, phases="P", rows=192, columns=192, pixel_spacing_mm=2.0
    )
    files = study.series[0].files
    assert storescu(files, node.settings.port).returncode == 0
    first = wait_until(lambda: _sent_row(node), 300, "the first SEG delivered")
    assert orthanc.count_instances() == 1

    # Part of the series arrives again: the series re-opens, the pipeline runs again and
    # the PACS still holds one SEG, with the same UIDs.
    assert storescu(files[:3], node.settings.port).returncode == 0
    second = wait_until(
        lambda: (row := _sent_row(node)) and row.sent_at > first.sent_at and row, 300, "re-run"
    )
    assert second.sop_uid == first.sop_uid
    with node.db.session() as s:
        assert [j.state for j in s.scalars(select(Job).order_by(Job.id))] == ["done", "done"]
    assert orthanc.count_instances() == 1
    assert orthanc.find_instance(first.sop_uid) is not None


def _sent_row(node) -> Dispatch | None:
    with node.db.session() as s:
        return s.scalars(select(Dispatch).where(Dispatch.state == "sent")).one_or_none()
