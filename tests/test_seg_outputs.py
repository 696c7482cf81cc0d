"""Per-destination SEG flavours and the empty-result policy, on the live node.

Three real Orthanc PACS: one gets BINARY SEGs and a "no finding" SEG when nothing is found,
one gets LABELMAP SEGs and nothing for an empty result, one gets RTSTRUCTs.
"""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from db.models import Dispatch, Event, Job
from devkit import dciodvfy
from devkit.expect import expected_result_uids
from devkit.orthanc import OrthancServer
from devkit.synth import generate_study
from inference.results import LABELMAP_SEG_SOP_CLASS_UID, SEG_SOP_CLASS_UID
from inference.seg_reader import seg_label_map
from tests.conftest import storescu, wait_until

pytestmark = pytest.mark.slow

# Orthanc 1.10's DCMTK predates the Label Map Segmentation SOP class.
ACCEPT_NEW_SOP_CLASSES = {"UnknownSopClassAccepted": True}


def _air_copy(files: list[Path], folder: Path) -> list[Path]:
    """The same series as a new study whose every voxel is air: nothing to segment."""
    folder.mkdir()
    study, series = generate_uid(), generate_uid()
    out = []
    for path in files:
        ds = pydicom.dcmread(path)
        air = (-1000.0 - float(ds.RescaleIntercept)) / float(ds.RescaleSlope)
        ds.PixelData = np.full(ds.pixel_array.shape, air, ds.pixel_array.dtype).tobytes()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        out.append(folder / path.name)
        ds.save_as(out[-1], enforce_file_format=True)
    return out


def test_each_destination_gets_its_seg_flavour_and_empty_policy(tmp_path, start_node):
    with (
        OrthancServer(
            tmp_path / "a", aet="PACS_A", extra_config=ACCEPT_NEW_SOP_CLASSES, throwaway=True
        ) as a,
        OrthancServer(
            tmp_path / "b", aet="PACS_B", extra_config=ACCEPT_NEW_SOP_CLASSES, throwaway=True
        ) as b,
        OrthancServer(tmp_path / "c", aet="PACS_C", throwaway=True) as c,
    ):
        node = start_node(
            destinations=[
                {"name": "binary", "ae_title": a.aet, "host": "127.0.0.1",
                 "port": a.dicom_port, "empty_result": "send"},
                {"name": "labelmap", "ae_title": b.aet, "host": "127.0.0.1",
                 "port": b.dicom_port, "result_type": "LABELMAP"},
                {"name": "rtstruct", "ae_title": c.aet, "host": "127.0.0.1",
                 "port": c.dicom_port, "result_type": "RTSTRUCT"},
            ]  # fmt: skip
        )
        study = generate_study(
            tmp_path / "study", seed=12, phases="P", rows=192, columns=192, pixel_spacing_mm=2.0
        )
        source = study.series[0]
        assert storescu(source.files, node.settings.port).returncode == 0
        inputs = {"image": source.files}
        _, binary_uid, _ = expected_result_uids(node, "tumor", inputs)
        _, labelmap_uid, _ = expected_result_uids(node, "tumor", inputs, "LABELMAP")
        assert binary_uid != labelmap_uid
        binary = a.instance_file(a.wait_for_instance(binary_uid, timeout_s=300))
        labelmap = b.instance_file(b.wait_for_instance(labelmap_uid, timeout_s=120))
        _, rtstruct_uid, _ = expected_result_uids(node, "tumor", inputs, "RTSTRUCT")
        rtstruct = c.instance_file(c.wait_for_instance(rtstruct_uid, timeout_s=120))
        assert (a.count_instances(), b.count_instances(), c.count_instances()) == (1, 1, 1)

        headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in source.files]
        source_uids = [str(ds.SOPInstanceUID) for ds in headers]
        maps = {}
        for name, blob, sop_class in (
            ("binary", binary, SEG_SOP_CLASS_UID),
            ("labelmap", labelmap, LABELMAP_SEG_SOP_CLASS_UID),
        ):
            seg = hd.seg.segread(io.BytesIO(blob))
            assert seg.SOPClassUID == sop_class
            assert seg.SegmentationType == name.upper()
            numbers, names = seg_label_map(seg, source_uids)
            maps[name] = (numbers, names)
            path = tmp_path / f"{name}.dcm"
            path.write_bytes(blob)
            assert dciodvfy.validate_file(path) == [], name
        # Same result in both flavours, voxel for voxel.
        (binary_map, binary_names), (labelmap_map, labelmap_names) = maps.values()
        assert binary_names == labelmap_names
        assert binary_map.any()
        np.testing.assert_array_equal(binary_map, labelmap_map)

        # The RTSTRUCT outlines the same labels, each contour on a real source slice.
        structure_set = pydicom.dcmread(io.BytesIO(rtstruct))
        assert structure_set.Modality == "RTSTRUCT"
        assert [r.ROIName for r in structure_set.StructureSetROISequence] == [
            "kidney",
            "kidney tumor",
        ]
        slice_z = {str(ds.SOPInstanceUID): float(ds.ImagePositionPatient[2]) for ds in headers}
        contours = [c for r in structure_set.ROIContourSequence for c in r.ContourSequence]
        assert contours
        for contour in contours:
            ref = str(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)
            assert {float(v) for v in contour.ContourData[2::3]} == {slice_z[ref]}
        path = tmp_path / "rtstruct.dcm"
        path.write_bytes(rtstruct)
        assert dciodvfy.validate_file(path) == []

        # An empty result: a "no finding" SEG for the destination that asked, nothing else.
        air = _air_copy(source.files, tmp_path / "air")
        air_series = str(pydicom.dcmread(air[0]).SeriesInstanceUID)
        assert storescu(air, node.settings.port).returncode == 0
        _, empty_uid, _ = expected_result_uids(node, "tumor", {"image": air})
        empty = hd.seg.segread(io.BytesIO(a.instance_file(a.wait_for_instance(empty_uid, 300))))
        assert "no finding" in empty.ContentDescription
        assert [s.SegmentLabel for s in empty.SegmentSequence] == ["kidney", "kidney tumor"]
        assert not empty.pixel_array.any()
        referenced = {
            str(i.ReferencedSOPInstanceUID)
            for r in empty.ReferencedSeriesSequence
            for i in r.ReferencedInstanceSequence
        }
        assert referenced <= {str(pydicom.dcmread(f).SOPInstanceUID) for f in air}
        path = tmp_path / "empty.dcm"
        path.write_bytes(a.instance_file(a.find_instance(empty_uid)))
        assert dciodvfy.validate_file(path) == []

        def second_job_done() -> bool:
            with node.db.session() as s:
                return [j.state for j in s.scalars(select(Job).order_by(Job.id))] == [
                    "done",
                    "done",
                ]

        wait_until(second_job_done, 60, "the empty study's job done")
        assert (a.count_instances(), b.count_instances(), c.count_instances()) == (2, 1, 1)
        with node.db.session() as s:
            rows = s.scalars(select(Dispatch).order_by(Dispatch.id)).all()
            assert [(r.destination, r.sop_uid, r.state) for r in rows] == [
                ("binary", binary_uid, "sent"),
                ("labelmap", labelmap_uid, "sent"),
                ("rtstruct", rtstruct_uid, "sent"),
                ("binary", empty_uid, "sent"),
            ]
            event = s.scalars(select(Event).where(Event.kind == "result_empty")).one()
            assert air_series in event.message and "binary" in event.message
            job = s.scalars(select(Job).order_by(Job.id.desc())).first()
            assert job.summary["empty"] is True
