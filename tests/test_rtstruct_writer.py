"""RTSTRUCT writer: contours that fill back to the label map, geometry, references, validity."""

from __future__ import annotations

import copy
import io
import logging
import math
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage
from skimage.draw import polygon

from devkit import dciodvfy
from inference.labels import (
    ANATOMICAL_STRUCTURE,
    MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
    Code,
    SegmentLabel,
)
from inference.rtstruct_writer import (
    DETACHED_STUDY_MANAGEMENT,
    build_rtstruct,
    write_rtstruct,
)
from inference.seg_writer import EmptySegmentationError
from kernel.uids import derived_uid
from tests.test_seg_writer import (
    ALGORITHM,
    COLUMNS,
    FRAME_OF_REFERENCE_UID,
    LABELS,
    ROWS,
    SERIES_UID,
    SLICES,
    STUDY_UID,
    _ct_slice,
)

RT_STRUCTURE_SET_STORAGE_UID = "1.2.840.10008.5.1.4.1.1.481.3"  # PS3.4 B.5

# Rows 4 mm apart, columns 5 mm apart: a swapped PixelSpacing shows up as misplaced points.
ROW_SPACING, COLUMN_SPACING = 4.0, 5.0
PATIENT_NAME = "Müller^Jörg"
RTSTRUCT_SERIES_UID = derived_uid(SERIES_UID, "rtstruct")
RTSTRUCT_SOP_UID = derived_uid(SERIES_UID, "rtstruct", "1")
VALUES = {label.name: label.value for label in LABELS}  # 1, 3, 5 (absent), 7
PRESENT = [label for label in LABELS if label.value != 5]


def _orientation(geometry: str) -> tuple[list[float], list[float]]:
    """(ImageOrientationPatient, in-plane origin) of an axial or an in-plane rotated series."""
    if geometry == "axial":
        return [1.0, 0.0, 0.0, 0.0, 1.0, 0.0], [-160.0, -160.0]
    angle = math.radians(30)
    cos, sin = round(math.cos(angle), 6), round(math.sin(angle), 6)
    return [cos, sin, 0.0, -sin, cos, 0.0], [-120.0, -170.0]


def _series(folder: Path, geometry: str) -> list[Path]:
    """The CT of test_seg_writer with anisotropic pixels, a Latin-1 name and a geometry."""
    orientation, (x, y) = _orientation(geometry)
    paths = []
    for z in range(SLICES):
        ds = _ct_slice(z)
        ds.PatientName = PATIENT_NAME
        ds.PixelSpacing = [ROW_SPACING, COLUMN_SPACING]
        ds.ImageOrientationPatient = orientation
        ds.ImagePositionPatient = [x, y, float(ds.ImagePositionPatient[2])]
        path = folder / f"{z:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture(scope="module", params=["axial", "rotated"])
def geometry(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def source_images(geometry, tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    """Headers only, as the worker reads them: the writer must not need PixelData."""
    folder = tmp_path_factory.mktemp(f"ct-{geometry}")
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in _series(folder, geometry)]
    return sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))


@pytest.fixture(scope="module")
def label_map() -> np.ndarray:
    labels = np.zeros((SLICES, ROWS, COLUMNS), dtype=np.uint8)
    left, right, tumor = VALUES["kidney_left"], VALUES["kidney_right"], VALUES["kidney_tumor"]
    labels[4:12, 20:40, 5:25] = left  # a box ...
    labels[6, 26:34, 10:20] = 0  # ... with a hole on one slice ...
    labels[6, 29:31, 14:16] = left  # ... and an island inside the hole
    rows, cols = np.ogrid[:ROWS, :COLUMNS]
    ellipse = ((rows - 30) / 12.5) ** 2 + ((cols - 50) / 10.5) ** 2 <= 1
    labels[6:14][:, ellipse] = right  # an elliptic cylinder ...
    labels[8:12, 26:34, 46:54] = 0  # ... with a hole through four slices ...
    labels[9:11, 28:32, 48:52] = tumor  # ... that holds the tumour
    labels[13, 0, 0] = tumor  # a lone voxel in the corner: contours must close at the edge
    labels[15, 2, 60] = tumor  # a lone voxel far from the origin on both axes
    return labels


def _build(source_images, label_map, labels=LABELS, **kwargs) -> Dataset:
    return build_rtstruct(
        source_images,
        label_map,
        labels,
        algorithm=ALGORITHM,
        series_instance_uid=RTSTRUCT_SERIES_UID,
        sop_instance_uid=RTSTRUCT_SOP_UID,
        series_number=9002,
        series_description="AI kidney contours",
        **kwargs,
    )


def _write(path, source_images, label_map, labels=LABELS, **kwargs) -> Path:
    return write_rtstruct(
        source_images,
        label_map,
        labels,
        path=path,
        algorithm=ALGORITHM,
        series_instance_uid=RTSTRUCT_SERIES_UID,
        sop_instance_uid=RTSTRUCT_SOP_UID,
        series_number=9002,
        series_description="AI kidney contours",
        software_versions="0.1.0",
        **kwargs,
    )


@pytest.fixture(scope="module")
def rtstruct_path(source_images, label_map, tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("rtstruct") / "rtstruct.dcm", source_images, label_map)


@pytest.fixture(scope="module")
def rtstruct(rtstruct_path) -> Dataset:
    return pydicom.dcmread(rtstruct_path)


def _points(contour: Dataset) -> np.ndarray:
    return np.array([float(v) for v in contour.ContourData]).reshape(-1, 3)


def _to_pixels(points: np.ndarray, image: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) indices of patient points on ``image``, inverting PS3.3 C.7.6.2.1.1."""
    offset = points - np.array([float(v) for v in image.ImagePositionPatient])
    orientation = np.array([float(v) for v in image.ImageOrientationPatient])
    row_spacing, column_spacing = (float(v) for v in image.PixelSpacing)
    return offset @ orientation[3:] / row_spacing, offset @ orientation[:3] / column_spacing


def _fill(rtstruct: Dataset, roi_number: int, source_images: list[Dataset]) -> np.ndarray:
    """The ROI rasterised on the source grid, contours of one slice combined even-odd."""
    z_of = {ds.SOPInstanceUID: z for z, ds in enumerate(source_images)}
    mask = np.zeros((SLICES, ROWS, COLUMNS), dtype=bool)
    (roi,) = [i for i in rtstruct.ROIContourSequence if i.ReferencedROINumber == roi_number]
    for contour in roi.ContourSequence:
        z = z_of[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
        rows, cols = _to_pixels(_points(contour), source_images[z])
        inside = np.zeros((ROWS, COLUMNS), dtype=bool)
        inside[polygon(rows, cols, shape=(ROWS, COLUMNS))] = True
        mask[z] ^= inside
    return mask


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_contours_fill_back_to_the_label_map(rtstruct, source_images, label_map):
    for label in PRESENT:
        filled = _fill(rtstruct, label.value, source_images)
        expected = label_map == label.value

        assert _dice(filled, expected) >= 0.9, label.name
        # Outlines run through pixel-edge midpoints: filling them is voxel-exact here.
        np.testing.assert_array_equal(filled, expected, err_msg=label.name)


def test_holes_and_islands_are_separate_closed_contours(rtstruct, source_images):
    slice_uids = {source_images[z].SOPInstanceUID: z for z in range(SLICES)}
    per_slice: dict[tuple[int, int], int] = {}
    for roi in rtstruct.ROIContourSequence:
        for contour in roi.ContourSequence:
            z = slice_uids[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
            key = (int(roi.ReferencedROINumber), z)
            per_slice[key] = per_slice.get(key, 0) + 1
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            assert int(contour.NumberOfContourPoints) * 3 == len(contour.ContourData)

    left, right = VALUES["kidney_left"], VALUES["kidney_right"]
    assert per_slice[(left, 5)] == 1
    assert per_slice[(left, 6)] == 3  # outline, hole, island
    assert [per_slice[(right, z)] for z in range(6, 14)] == [1, 1, 2, 2, 2, 2, 1, 1]


def test_every_contour_lies_on_the_slice_it_references(rtstruct, source_images):
    by_uid = {ds.SOPInstanceUID: ds for ds in source_images}
    for roi in rtstruct.ROIContourSequence:
        for contour in roi.ContourSequence:
            (reference,) = contour.ContourImageSequence
            assert reference.ReferencedSOPClassUID == CTImageStorage
            image = by_uid[reference.ReferencedSOPInstanceUID]  # a source instance
            points = _points(contour)
            assert np.allclose(points[:, 2], float(image.ImagePositionPatient[2]))


# Centre of the lone voxel at row 2, column 60 of slice 15, worked out by hand:
# position + 60 columns * 5 mm along IOP[0:3] + 2 rows * 4 mm along IOP[3:6].
LONE_VOXEL_CENTRE = {
    "axial": [-160.0 + 300.0, -160.0 + 8.0, -100.0 + 15 * 2.5],
    "rotated": [
        -120.0 + 300.0 * 0.866025 - 8.0 * 0.5,
        -170.0 + 300.0 * 0.5 + 8.0 * 0.866025,
        -62.5,
    ],
}


def test_patient_coordinates_follow_pixel_spacing_order(rtstruct, source_images, geometry):
    (roi,) = [i for i in rtstruct.ROIContourSequence if i.ReferencedROINumber == 7]
    slice_uid = source_images[15].SOPInstanceUID
    (contour,) = [
        c
        for c in roi.ContourSequence
        if c.ContourImageSequence[0].ReferencedSOPInstanceUID == slice_uid
    ]
    points = _points(contour)

    centre = points.mean(axis=0)
    assert np.allclose(centre, LONE_VOXEL_CENTRE[geometry], atol=0.01)
    # A diamond through the pixel's edge midpoints: half a row and half a column out.
    distances = sorted(np.linalg.norm(points - centre, axis=1).round(2))
    assert distances == [ROW_SPACING / 2] * 2 + [COLUMN_SPACING / 2] * 2


def test_contour_data_are_valid_ds_strings_in_hundredths(rtstruct_path):
    rtstruct = pydicom.dcmread(rtstruct_path)
    for roi in rtstruct.ROIContourSequence:
        for contour in roi.ContourSequence:
            for value in contour.ContourData:
                text = value.original_string
                assert len(text) <= 16
                assert re.fullmatch(r"-?\d+\.\d{2}", text), text
                assert text != "-0.00"


def test_references_list_every_source_image(rtstruct, source_images):
    (frame,) = rtstruct.ReferencedFrameOfReferenceSequence
    assert frame.FrameOfReferenceUID == FRAME_OF_REFERENCE_UID
    (study,) = frame.RTReferencedStudySequence
    assert study.ReferencedSOPClassUID == DETACHED_STUDY_MANAGEMENT
    assert study.ReferencedSOPInstanceUID == STUDY_UID
    (series,) = study.RTReferencedSeriesSequence
    assert series.SeriesInstanceUID == SERIES_UID
    assert [i.ReferencedSOPInstanceUID for i in series.ContourImageSequence] == [
        ds.SOPInstanceUID for ds in source_images
    ]
    assert {i.ReferencedSOPClassUID for i in series.ContourImageSequence} == {CTImageStorage}


def test_header_copies_patient_and_study_and_names_the_series(rtstruct):
    assert rtstruct.SOPClassUID == RT_STRUCTURE_SET_STORAGE_UID
    assert rtstruct.file_meta.MediaStorageSOPClassUID == RT_STRUCTURE_SET_STORAGE_UID
    assert rtstruct.file_meta.MediaStorageSOPInstanceUID == RTSTRUCT_SOP_UID
    assert rtstruct.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert rtstruct.SOPInstanceUID == RTSTRUCT_SOP_UID
    assert rtstruct.SeriesInstanceUID == RTSTRUCT_SERIES_UID
    assert rtstruct.Modality == "RTSTRUCT"
    assert rtstruct.SeriesNumber == 9002
    assert rtstruct.SeriesDescription == "AI kidney contours"
    assert rtstruct.SpecificCharacterSet == "ISO_IR 100"  # the source's set carries it
    assert str(rtstruct.PatientName) == PATIENT_NAME
    assert rtstruct.PatientID == "PHANTOM-001"
    assert rtstruct.StudyInstanceUID == STUDY_UID
    assert rtstruct.AccessionNumber == "ACC0001"
    assert rtstruct.FrameOfReferenceUID == FRAME_OF_REFERENCE_UID
    assert (rtstruct.Manufacturer, rtstruct.SoftwareVersions) == ("dicom-node", "0.1.0")
    assert rtstruct.StructureSetLabel == "AI kidney contou"  # SH: 16 characters
    assert rtstruct.StructureSetDate == rtstruct.InstanceCreationDate


def test_rois_carry_names_colours_codes_and_algorithm(rtstruct):
    numbers = [int(i.ROINumber) for i in rtstruct.StructureSetROISequence]
    assert numbers == [label.value for label in PRESENT]
    colours = {int(i.ReferencedROINumber): i.ROIDisplayColor for i in rtstruct.ROIContourSequence}
    observations = {int(i.ReferencedROINumber): i for i in rtstruct.RTROIObservationsSequence}
    for roi, label in zip(rtstruct.StructureSetROISequence, PRESENT, strict=True):
        assert roi.ROIName == label.name
        assert roi.ReferencedFrameOfReferenceUID == FRAME_OF_REFERENCE_UID
        assert roi.ROIGenerationAlgorithm == "AUTOMATIC"
        assert roi.ROIGenerationDescription == "kidney-tumor-nnunet 2.5.1+fold0"
        assert list(colours[label.value]) == list(label.color_rgb)
        observation = observations[label.value]
        assert observation.ObservationNumber == label.value
        assert observation.ROIInterpreter == ""
        expected_type = "ORGAN" if label.category == ANATOMICAL_STRUCTURE else "CONTROL"
        assert observation.RTROIInterpretedType == expected_type
        (code,) = observation.RTROIIdentificationCodeSequence
        assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == (
            label.type.value,
            label.type.scheme,
            label.type.meaning,
        )
        if label.laterality is None:
            assert "SegmentedPropertyTypeModifierCodeSequence" not in code
        else:
            assert code.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == (
                label.laterality.value
            )


def test_absent_label_is_skipped_with_a_log_line(source_images, label_map, caplog):
    with caplog.at_level(logging.INFO, logger="inference"):
        rtstruct = _build(source_images, label_map)

    assert "kidney_cyst" not in [i.ROIName for i in rtstruct.StructureSetROISequence]
    assert 5 not in [i.ReferencedROINumber for i in rtstruct.RTROIObservationsSequence]
    assert any("label 5 (kidney_cyst) absent" in message for message in caplog.messages)


def test_empty_label_map_raises_naming_the_series(source_images):
    empty = np.zeros((SLICES, ROWS, COLUMNS), dtype=np.uint8)

    with pytest.raises(EmptySegmentationError, match=SERIES_UID):
        _build(source_images, empty)


def test_allow_empty_writes_every_label_without_contours(tmp_path, source_images):
    empty = np.zeros((SLICES, ROWS, COLUMNS), dtype=np.uint8)

    path = _write(tmp_path / "empty.dcm", source_images, empty, allow_empty=True)
    rtstruct = pydicom.dcmread(path)

    assert [i.ROIName for i in rtstruct.StructureSetROISequence] == [x.name for x in LABELS]
    assert [int(i.ReferencedROINumber) for i in rtstruct.ROIContourSequence] == [1, 3, 5, 7]
    assert all("ContourSequence" not in i for i in rtstruct.ROIContourSequence)
    # kidney_cyst has no colour of its own: it gets a fixed fallback.
    assert len(rtstruct.ROIContourSequence[2].ROIDisplayColor) == 3
    assert dciodvfy.validate_file(path) == []


def test_fallback_colour_is_fixed_per_label_value(source_images, label_map):
    plain = [SegmentLabel(x.value, x.name, x.category, x.type) for x in LABELS]

    first = _build(source_images, label_map, labels=plain)
    second = _build(source_images, label_map, labels=plain[::-1])

    colours = [list(i.ROIDisplayColor) for i in first.ROIContourSequence]
    assert colours == [list(i.ROIDisplayColor) for i in second.ROIContourSequence]
    assert len({tuple(c) for c in colours}) == len(colours)


def test_undescribed_label_value_is_rejected(source_images, label_map):
    with pytest.raises(ValueError, match=r"values \[3\]"):
        _build(source_images, label_map, labels=[LABELS[0], LABELS[3]])


def test_label_map_must_match_the_series_geometry(source_images, label_map):
    with pytest.raises(ValueError, match="does not match series"):
        _build(source_images, label_map[:-1])


def test_source_images_must_share_one_frame_of_reference(source_images, label_map):
    mixed = list(source_images)
    mixed[3] = copy.deepcopy(mixed[3])
    mixed[3].FrameOfReferenceUID = derived_uid("another frame")

    with pytest.raises(ValueError, match="FrameOfReferenceUID"):
        _build(mixed, label_map)


_CREATION_TIME = (
    "InstanceCreationDate",
    "InstanceCreationTime",
    "SeriesDate",
    "SeriesTime",
    "StructureSetDate",
    "StructureSetTime",
)


def _encoded_without_creation_time(rtstruct: Dataset) -> bytes:
    for keyword in _CREATION_TIME:
        setattr(rtstruct, keyword, "")
    buffer = io.BytesIO()
    rtstruct.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_same_inputs_give_identical_content(source_images, label_map):
    first = _build(source_images, label_map)
    second = _build(source_images, label_map, labels=LABELS[::-1])

    assert _encoded_without_creation_time(first) == _encoded_without_creation_time(second)


def test_write_is_atomic_and_leaves_no_partial_file(tmp_path, source_images, label_map):
    path = _write(tmp_path / "out.dcm", source_images, label_map)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.dcm"]
    assert pydicom.dcmread(path).SOPInstanceUID == RTSTRUCT_SOP_UID


def test_rtstruct_passes_dciodvfy(rtstruct_path):
    dciodvfy.find_dciodvfy()  # the setup script installs it; missing is a failure

    assert dciodvfy.validate_file(rtstruct_path) == []


def test_validate_file_reports_a_broken_rtstruct(tmp_path, source_images, label_map):
    rtstruct = _build(source_images, label_map)
    del rtstruct.StructureSetROISequence[0].ROINumber
    rtstruct.save_as(tmp_path / "broken.dcm", enforce_file_format=True)

    errors = dciodvfy.validate_file(tmp_path / "broken.dcm")

    assert any("ROINumber" in error for error in errors)


def test_interpreted_type_follows_the_category(source_images, label_map):
    liver = Code("10200004", "SCT", "Liver")
    labels = [
        SegmentLabel(1, "a", ANATOMICAL_STRUCTURE, liver),
        SegmentLabel(3, "b", MORPHOLOGICALLY_ABNORMAL_STRUCTURE, liver),
        SegmentLabel(7, "c", ANATOMICAL_STRUCTURE, liver),
    ]

    rtstruct = _build(source_images, label_map, labels=labels)

    observations = rtstruct.RTROIObservationsSequence
    assert [i.RTROIInterpretedType for i in observations] == ["ORGAN", "CONTROL", "ORGAN"]
    assert {i.RTROIIdentificationCodeSequence[0].CodeValue for i in observations} == {"10200004"}
