"""Synthetic CT studies: scanner-like headers, exact pixels, truth aligned with the files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from devkit.phantom import STRUCTURES, Phantom, grid_points
from devkit.synth import (
    SynthStudy,
    generate_study,
    phantom_volumes,
    series_geometry,
    write_truth_nifti,
)

SMALL = {"rows": 128, "columns": 128, "pixel_spacing_mm": 3.0}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> SynthStudy:
    return generate_study(tmp_path_factory.mktemp("study"), seed=3, **SMALL)


def _hu(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)


def test_every_file_is_a_ct_image_with_valid_file_meta(study: SynthStudy) -> None:
    for series in study.series:
        for path in series.files:
            assert path.read_bytes()[128:132] == b"DICM"
            ds = pydicom.dcmread(path)
            assert ds.file_meta.MediaStorageSOPClassUID == CTImageStorage
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert ds.SOPClassUID == CTImageStorage
            assert ds.Modality == "CT"
            assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
            assert ds.StudyInstanceUID == study.study_uid
            assert ds.SeriesInstanceUID == series.series_uid
            assert ds.PatientID == study.patient_id
            assert ds.AccessionNumber == study.accession
            assert ds.FrameOfReferenceUID == study.frame_of_reference_uid
            assert ds.ImagesInAcquisition == len(series.files)
            assert ds.PatientPosition == "HFS"
            assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 12, 11)
            assert ds.PixelRepresentation == 0
            assert (ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType) == (-1024, 1, "HU")
            for keyword in ("Manufacturer", "ManufacturerModelName", "StationName", "KVP"):
                assert ds.get(keyword), keyword


def test_slices_are_evenly_spaced_and_files_match_truth_order(study: SynthStudy) -> None:
    for series in study.series:
        datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in series.files]
        z = np.array([float(ds.ImagePositionPatient[2]) for ds in datasets])
        np.testing.assert_allclose(np.diff(z), series.spacing_zyx[0], atol=1e-3)
        np.testing.assert_allclose(z[0], series.origin_lps[2], atol=1e-3)
        np.testing.assert_allclose([float(ds.SliceLocation) for ds in datasets], z, atol=1e-3)
        assert float(datasets[0].SpacingBetweenSlices) == series.spacing_zyx[0]
        assert float(datasets[0].SliceThickness) == series.spacing_zyx[0]
        assert [float(v) for v in datasets[0].PixelSpacing] == list(series.spacing_zyx[1:])
        # Scanners number head first; consumers must sort by position, not number.
        assert [ds.InstanceNumber for ds in datasets] == list(range(len(datasets), 0, -1))
        assert series.truth.shape == (len(series.files), 128, 128)


def test_truth_slice_k_lies_under_file_k(study: SynthStudy) -> None:
    series = study.by_phase("D")
    kidney = np.isin(series.truth, [STRUCTURES["kidney_left"], STRUCTURES["kidney_right"]])
    k = int(np.argmax(kidney.sum(axis=(1, 2))))
    hu = _hu(series.files[k])
    assert np.array_equal(hu, series.hu[k])
    air = series.truth[k] == 0
    assert hu[air].mean() < -900
    assert 90 < hu[kidney[k]].mean() < 170
    ureters = np.isin(series.truth, [STRUCTURES["ureter_left"], STRUCTURES["ureter_right"]])
    k = int(np.argmax(ureters.sum(axis=(1, 2))))
    assert _hu(series.files[k])[ureters[k]].mean() > 300  # excreted contrast


def test_contrast_tags_only_on_contrast_phases(study: SynthStudy) -> None:
    for series in study.series:
        ds = pydicom.dcmread(series.files[0], stop_before_pixels=True)
        if series.phase == "N":
            assert "ContrastBolusAgent" not in ds
            assert "ContrastBolusStartTime" not in ds
        else:
            assert ds.ContrastBolusAgent
            assert ds.ContrastBolusRoute == "IV"
            assert ds.ContrastBolusStartTime


def test_acquisition_times_follow_the_bolus(study: SynthStudy) -> None:
    times = {
        s.phase: pydicom.dcmread(s.files[0], stop_before_pixels=True).AcquisitionTime
        for s in study.series
    }
    assert times["N"] < times["A"] < times["P"] < times["D"]
    bolus = pydicom.dcmread(study.by_phase("A").files[0]).ContrastBolusStartTime
    assert times["N"] < bolus < times["A"]


def test_series_descriptions_and_numbers(tmp_path: Path) -> None:
    custom = generate_study(
        tmp_path, seed=1, phases="AP", descriptions={"A": "복부 동맥기"}, slices=4, **SMALL
    )
    assert custom.by_phase("A").description == "복부 동맥기"
    assert custom.by_phase("P").description == "ABD 2.5mm PORTAL VENOUS"
    assert [s.series_number for s in custom.series] == [3, 4]
    assert custom.by_phase("P").files[0].parent.name == "04_P"
    ds = pydicom.dcmread(custom.by_phase("A").files[0])
    assert ds.SeriesDescription == "복부 동맥기"


def test_truth_contains_every_structure(study: SynthStudy) -> None:
    present = set(np.unique(study.by_phase("P").truth))
    assert set(STRUCTURES.values()) <= present


@pytest.mark.parametrize(
    "transfer_syntax",
    [ImplicitVRLittleEndian, RLELossless, JPEGLSLossless, JPEG2000Lossless, JPEGLosslessSV1],
    ids=lambda uid: uid.name,
)
def test_lossless_transfer_syntaxes_decode_to_the_same_pixels(
    tmp_path: Path, transfer_syntax: str
) -> None:
    compressed = generate_study(
        tmp_path, seed=5, phases="D", slices=3, transfer_syntax=transfer_syntax, **SMALL
    )
    series = compressed.by_phase("D")
    reference, _ = phantom_volumes(5, "D", series_geometry(Phantom(5), slices=3, **SMALL))
    for k, path in enumerate(series.files):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == transfer_syntax
        assert np.array_equal(_hu(path), reference["D"][k])


def test_geometry_override_changes_only_that_phase(tmp_path: Path) -> None:
    overridden = generate_study(
        tmp_path,
        seed=2,
        phases="AP",
        geometry={
            "P": {
                "rows": 100,
                "columns": 110,
                "pixel_spacing_mm": 3.5,
                "slice_thickness_mm": 5.0,
                "z_offset_mm": 7.5,
                "xy_offset_mm": (10.0, -5.0),
            }
        },
        **SMALL,
    )
    a, p = overridden.by_phase("A"), overridden.by_phase("P")
    assert a.shape_zyx[1:] == (128, 128) and a.spacing_zyx == (2.5, 3.0, 3.0)
    assert p.shape_zyx[1:] == (100, 110) and p.spacing_zyx == (5.0, 3.5, 3.5)
    assert len(p.files) == p.shape_zyx[0] < len(a.files)
    ds = pydicom.dcmread(p.files[0])
    assert (ds.Rows, ds.Columns) == (100, 110)
    assert float(ds.SpacingBetweenSlices) == 5.0
    assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx(list(p.origin_lps))
    assert p.origin_lps != a.origin_lps
    # Both grids sample the same anatomy: the same frame of reference, the same kidney.
    assert ds.FrameOfReferenceUID == pydicom.dcmread(a.files[0]).FrameOfReferenceUID
    voxel_ml = {s.phase: np.prod(s.spacing_zyx) / 1000 for s in (a, p)}
    kidney = STRUCTURES["kidney_left"]
    ml = {s.phase: (s.truth == kidney).sum() * voxel_ml[s.phase] for s in (a, p)}
    assert ml["P"] == pytest.approx(ml["A"], rel=0.15)


def test_same_seed_gives_same_uids_and_pixels(tmp_path: Path) -> None:
    first = generate_study(tmp_path / "one", seed=9, phases="NA", slices=4, **SMALL)
    second = generate_study(tmp_path / "two", seed=9, phases="NA", slices=4, **SMALL)
    other = generate_study(tmp_path / "three", seed=10, phases="NA", slices=4, **SMALL)
    assert first.study_uid == second.study_uid != other.study_uid
    for a, b in zip(first.series, second.series, strict=True):
        assert a.series_uid == b.series_uid
        for fa, fb in zip(a.files, b.files, strict=True):
            da, db = pydicom.dcmread(fa), pydicom.dcmread(fb)
            assert da.SOPInstanceUID == db.SOPInstanceUID
            assert np.array_equal(da.pixel_array, db.pixel_array)
    uids = {pydicom.dcmread(f).SOPInstanceUID for s in first.series for f in s.files}
    assert len(uids) == sum(len(s.files) for s in first.series)


def test_grid_fast_path_agrees_with_point_sampling() -> None:
    phantom = Phantom(4)
    geometry = series_geometry(phantom, rows=64, columns=64, pixel_spacing_mm=6.0)
    args = (geometry.origin_lps, geometry.spacing_zyx, geometry.shape_zyx)
    on_grid = phantom.labels_on_grid(*args)
    assert np.array_equal(on_grid, phantom.labels(grid_points(*args)))


def test_truth_nifti_lies_in_the_series_physical_space(study: SynthStudy, tmp_path: Path) -> None:
    series = study.by_phase("A")
    write_truth_nifti(series, tmp_path / "truth.nii.gz")
    image = sitk.ReadImage(str(tmp_path / "truth.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(image), series.truth)
    np.testing.assert_allclose(image.GetOrigin(), series.origin_lps, atol=1e-3)
    np.testing.assert_allclose(image.GetSpacing(), series.spacing_zyx[::-1], atol=1e-6)
    # The DICOM series read by SimpleITK lands on the same grid.
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(
        reader.GetGDCMSeriesFileNames(str(series.files[0].parent), series.series_uid)
    )
    ct = reader.Execute()
    np.testing.assert_allclose(ct.GetOrigin(), image.GetOrigin(), atol=1e-3)
    assert np.array_equal(sitk.GetArrayFromImage(ct), series.hu)


@pytest.mark.parametrize("rows", [64, 128, 512])
def test_synth_command_keeps_the_whole_body_in_view_at_any_matrix(
    tmp_path: Path, rows: int
) -> None:
    """``dicom-node synth --rows N`` changes the pixel size, not the field of view: every
    structure of the phantom (kidneys included) is in the images at every N."""
    from dicom_node.cli import main

    out = tmp_path / "study"
    assert main(["synth", str(out), "--phases", "P", "--rows", str(rows), "--truth"]) == 0
    first = pydicom.dcmread(sorted(out.glob("*_P/*.dcm"))[0], stop_before_pixels=True)
    assert (first.Rows, first.Columns) == (rows, rows)
    field_of_view_mm = float(first.PixelSpacing[0]) * rows
    assert field_of_view_mm == pytest.approx(0.78 * 512, abs=0.1)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "truth_P.nii.gz")))
    assert set(STRUCTURES.values()) <= set(np.unique(truth))
