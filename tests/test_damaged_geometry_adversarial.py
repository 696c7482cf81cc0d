"""Damaged geometry and rescale headers that got past the first round of checks
(``tests/test_damaged_geometry.py``), and intact series it refused.

- A DS value with digit-grouping underscores (``1_2``): not a DS character (PS3.5 6.2),
  but Python's ``float`` reads it as 12 while GDCM, which decodes the volume, reads 1:
  the checks passed one geometry (or intercept) and the volume got another.
- A slice position whose projection on the slice normal overflows to infinity passed
  as a finite position and surfaced as "uneven slice spacing ... missing slices?".
- A finite but absurd PixelSpacing made a stack key of hundreds of characters (the
  database column holds 160: PostgreSQL refuses the instance row).
- A RescaleSlope / RescaleIntercept that is finite in the header but overflows the
  float32 volume gave infinite voxels.
- A NumberOfFrames that is not a number, or a one-slice series' SliceThickness that is
  nan, infinite, negative or not a number: ``ValueError`` / ``RuntimeError`` or a NaN
  slice spacing instead of a ``SeriesReadError`` naming the instance.
- A damaged localizer, a damaged image of another SOP Class, or a damaged DERIVED image
  next to an ORIGINAL stack, with the main stack's matrix (a GE scout is 512 x 512): it
  cannot be a slice of the main stack, yet it refused the whole series.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from devkit.synth import generate_study
from dicom_node.instance import parse_header
from inference.stacks import DAMAGED, STACK_KEY_CHARS, slice_info
from inference.volume import SeriesReadError, load_series
from tests.test_damaged_geometry import SIZE, _encoded, _rewrite, _sop


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("adversarial")
    return generate_study(root / "study", seed=12, **SIZE).series[0].files


def _raw(keyword: str, text: str, vr: str = "DS"):
    """An edit that writes ``text`` as the element's bytes, unchanged by pydicom."""
    value = text.encode("ascii")
    value += b" " * (len(value) % 2)
    tag = Tag(pydicom.datadict.tag_for_keyword(keyword))

    def edit(ds: Dataset) -> None:
        ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)

    return edit


def _both(*edits):
    def edit(ds: Dataset) -> None:
        for one in edits:
            one(ds)

    return edit


def _refusal(files: list[Path]) -> str:
    with pytest.raises(SeriesReadError) as caught:
        load_series(files)
    return str(caught.value)


# --- DS values Python reads but GDCM reads otherwise --------------------------------


@pytest.mark.parametrize(
    ("keyword", "text"),
    [
        ("PixelSpacing", "1_2\\1_2"),  # 12 to Python, 1 and 2 to GDCM
        ("ImagePositionPatient", "-1_86\\-176\\-27.2"),  # origin (-1, 86, -176) to GDCM
    ],
)
def test_underscores_in_a_geometry_value_are_damage(ct_files, tmp_path, keyword, text):
    files = _rewrite(ct_files, tmp_path / "series", {3: _raw(keyword, text)})
    ds = pydicom.dcmread(files[3], stop_before_pixels=True)
    key = slice_info(ds).stack_key
    assert key is not None and key.startswith(f"{DAMAGED} - 32x32 - {keyword}"), key
    # The receive path stores the same verdict (it reads the element bytes itself).
    assert parse_header(files[3].read_bytes()).stack_key == key
    message = _refusal(files)
    assert _sop(files[3]) in message and keyword in message, message


def test_underscores_in_the_rescale_intercept_are_damage(ct_files, tmp_path):
    """``-1_024`` is -1024 to Python and -1 to GDCM: every HU 1023 too high."""
    files = _rewrite(ct_files, tmp_path / "series", {5: _raw("RescaleIntercept", "-1_024")})
    message = _refusal(files)
    assert _sop(files[5]) in message and "RescaleIntercept" in message, message


# --- values finite in the header, not in what is computed from them --------------------


def test_a_position_whose_projection_overflows_is_damage(ct_files, tmp_path):
    oblique = _raw("ImageOrientationPatient", "1\\0\\0\\0\\0.70710678\\-0.70710678")
    edits = dict.fromkeys(range(len(ct_files)), oblique)
    edits[3] = _both(oblique, _raw("ImagePositionPatient", "0\\1.7e308\\1.7e308"))
    files = _rewrite(ct_files, tmp_path / "series", edits)
    header = parse_header(files[3].read_bytes())
    assert header.slice_position_mm is None  # never inf in the database
    assert header.stack_key is not None and header.stack_key.startswith(DAMAGED)
    assert header.stack_key == slice_info(pydicom.dcmread(files[3])).stack_key
    message = _refusal(files)
    assert _sop(files[3]) in message and "ImagePositionPatient" in message, message
    assert "missing slices" not in message, message


@pytest.mark.parametrize("spacing", ["1e300\\1e300", "12\\1e40", "123456789012\\0.5"])
def test_a_stack_key_fits_its_database_column(ct_files, spacing):
    ds = pydicom.dcmread(ct_files[3])
    _raw("PixelSpacing", spacing)(ds)
    key = parse_header(_encoded(ds)).stack_key
    assert key is not None and len(key) <= STACK_KEY_CHARS, (len(key), key)
    assert key == slice_info(ds).stack_key


@pytest.mark.parametrize(
    ("keyword", "text"),
    [("RescaleSlope", "1e38"), ("RescaleIntercept", "-1e39"), ("RescaleSlope", "-1e36")],
)
def test_a_rescale_beyond_float32_is_damage(ct_files, tmp_path, keyword, text):
    """1e38 x 4095 is infinite in the float32 volume; -1e39 is infinite on its own."""
    files = _rewrite(ct_files, tmp_path / "series", {2: _raw(keyword, text)})
    message = _refusal(files)
    assert _sop(files[2]) in message and keyword in message, message


def test_a_negative_or_large_but_representable_rescale_still_reads(ct_files, tmp_path):
    edits = dict.fromkeys(range(len(ct_files)), _raw("RescaleSlope", "-1E+3"))
    volume = load_series(_rewrite(ct_files, tmp_path / "series", edits))
    assert np.isfinite(volume.array).all() and volume.array.min() < -2000  # slope applied


# --- other header values the reader converts ----------------------------------------


@pytest.mark.parametrize("text", ["abc", "1\\\\2"])
def test_a_number_of_frames_that_is_not_a_number_is_a_read_error(ct_files, tmp_path, text):
    files = _rewrite(ct_files, tmp_path / "series", {4: _raw("NumberOfFrames", text, "IS")})
    message = _refusal(files)
    assert _sop(files[4]) in message and "NumberOfFrames" in message, message


@pytest.mark.parametrize("text", ["nan", "inf", "-2.5", "abc", "1_0"])
def test_a_one_slice_series_with_a_damaged_slice_thickness_is_refused(ct_files, tmp_path, text):
    files = _rewrite(ct_files[3:4], tmp_path / "series", {0: _raw("SliceThickness", text)})
    message = _refusal(files)
    assert _sop(files[0]) in message and "SliceThickness" in message, message


@pytest.mark.parametrize(("text", "expected"), [("2.5", 2.5), ("+5E-1", 0.5), ("", 1.0)])
def test_a_one_slice_series_reads_its_slice_thickness(ct_files, tmp_path, text, expected):
    files = _rewrite(ct_files[3:4], tmp_path / "series", {0: _raw("SliceThickness", text)})
    volume = load_series(files)
    assert volume.shape == (1, 32, 32)
    assert volume.spacing_zyx[0] == expected
    assert all(math.isfinite(v) for v in volume.spacing_zyx)


# --- damaged images that cannot be slices of the main stack ----------------------------


def _localizer(ds: Dataset) -> None:
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = [0, 0, 0, 0, 0, 0]


def _secondary_capture(ds: Dataset) -> None:
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.ImageOrientationPatient = [0, 0, 0, 0, 0, 0]


def _derived(ds: Dataset) -> None:
    ds.ImageType = ["DERIVED", "SECONDARY", "MPR"]
    ds.PixelSpacing = [0, 0]


@pytest.mark.parametrize(
    ("edit", "damage"),
    [
        (_localizer, "unit vectors"),
        (_secondary_capture, "unit vectors"),
        (_derived, "not positive"),
    ],
    ids=["localizer", "other SOP Class", "DERIVED next to ORIGINAL"],
)
def test_a_damaged_image_that_cannot_join_the_main_stack_is_only_left_out(
    ct_files, tmp_path, edit, damage
):
    intact = load_series(ct_files)
    files = _rewrite(ct_files, tmp_path / "series", {})
    extra = pydicom.dcmread(ct_files[0])
    extra.SOPInstanceUID = extra.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    edit(extra)
    extra.save_as(tmp_path / "series" / "extra.dcm", enforce_file_format=False)
    volume = load_series([*files, tmp_path / "series" / "extra.dcm"])
    assert volume.shape == intact.shape and (volume.array == intact.array).all()
    assert any(
        "32x32 with a damaged header" in line and damage in line for line in volume.left_out
    ), volume.left_out


def test_a_damaged_image_of_the_main_stacks_kind_and_class_still_refuses(ct_files, tmp_path):
    files = _rewrite(ct_files, tmp_path / "series", {})
    extra = pydicom.dcmread(ct_files[0])
    extra.SOPInstanceUID = extra.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    extra.ImageOrientationPatient = [0, 0, 0, 0, 0, 0]
    extra.save_as(tmp_path / "series" / "extra.dcm", enforce_file_format=False)
    message = _refusal([*files, tmp_path / "series" / "extra.dcm"])
    assert str(extra.SOPInstanceUID) in message and "unit vectors" in message, message
