"""Geometry headers that are present but unusable: a value that is not a finite number
(``nan``, ``inf``), direction cosines that are not perpendicular unit vectors, a
PixelSpacing that is missing or not positive, a RescaleSlope that cannot give HU.

Before, such a series was read as if nothing were wrong: a NaN slice position sorted
anywhere in the stack and passed every spacing check (comparisons with NaN are false), a
missing or zero PixelSpacing became 1 mm or 0 mm voxels, skewed cosines became a skewed
volume. Now the image is DAMAGED (``inference.stacks.geometry_problem``), never part of a
stack, and a series where it may belong to the main stack is refused with a
``SeriesReadError`` naming the instance and the attribute. The receive path stores the
same verdict (``parse_header`` -> ``stack_key``), so routing explains it too.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from devkit.synth import generate_study
from dicom_node.instance import parse_header
from dicom_node.series_attrs import from_files
from inference.orientation import StackGeometryError, stack_geometry
from inference.stacks import DAMAGED, geometry_problem, slice_info
from inference.volume import SeriesReadError, load_series
from tests.test_stacks import AXIAL, image

SIZE = dict(phases="P", rows=32, columns=32, pixel_spacing_mm=12.0, slices=8)

# Damage to one header: (name, edit, words the refusal must contain).
Edit = Callable[[Dataset], None]


def _ipp(axis: int, value: str) -> Edit:
    def edit(ds: Dataset) -> None:
        values = [str(v) for v in ds.ImagePositionPatient]
        values[axis] = value
        ds.ImagePositionPatient = values

    return edit


def _set(keyword: str, value: object) -> Edit:
    return lambda ds: setattr(ds, keyword, value)


def _delete(keyword: str) -> Edit:
    return lambda ds: delattr(ds, keyword)


IOP = "ImageOrientationPatient"
ONE_SLICE = [
    ("position along the normal nan", _ipp(2, "nan"), "ImagePositionPatient"),
    ("position in plane nan", _ipp(0, "NaN"), "ImagePositionPatient"),
    ("position -inf", _ipp(1, "-inf"), "ImagePositionPatient"),
    ("orientation inf", _set(IOP, ["1", "0", "0", "0", "inf", "0"]), "not a finite"),
    ("orientation zero", _set(IOP, [0, 0, 0, 0, 0, 0]), "unit vectors"),
    ("orientation scaled", _set(IOP, [2, 0, 0, 0, 2, 0]), "unit vectors"),
    ("orientation parallel", _set(IOP, [1, 0, 0, 1, 0, 0]), "perpendicular"),
    ("orientation skewed", _set(IOP, [1, 0, 0, 0.3, 0.954, 0]), "perpendicular"),
    ("orientation five values", _set(IOP, [1, 0, 0, 0, 1]), "6 numbers"),
    ("spacing zero", _set("PixelSpacing", [0, 0]), "not positive"),
    ("spacing negative", _set("PixelSpacing", [12, -12]), "not positive"),
    ("spacing nan", _set("PixelSpacing", ["nan", "12"]), "PixelSpacing"),
    ("spacing one value", _set("PixelSpacing", [12]), "2 numbers"),
    ("spacing missing", _delete("PixelSpacing"), "PixelSpacing is missing"),
    ("rescale slope nan", _set("RescaleSlope", "nan"), "RescaleSlope"),
    ("rescale slope zero", _set("RescaleSlope", 0), "RescaleSlope is 0"),
    ("rescale intercept inf", _set("RescaleIntercept", "inf"), "RescaleIntercept"),
]  # fmt: skip


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("geometry")
    return generate_study(root / "study", seed=12, **SIZE).series[0].files


def _rewrite(files: list[Path], folder: Path, edits: dict[int, Edit]) -> list[Path]:
    """The series in ``folder``, file ``i`` edited by ``edits[i]`` (pydicom writes the DS
    strings as given, ``nan`` included)."""
    folder.mkdir()
    out = []
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        if i in edits:
            edits[i](ds)
        out.append(folder / path.name)
        ds.save_as(out[-1], enforce_file_format=False)
    return out


def _sop(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@pytest.mark.parametrize("where", ["middle", "first", "last"])
@pytest.mark.parametrize(("name", "edit", "words"), ONE_SLICE, ids=[c[0] for c in ONE_SLICE])
def test_one_damaged_slice_refuses_the_series_naming_it(
    ct_files, tmp_path, where, name, edit, words
):
    index = {"middle": len(ct_files) // 2, "first": 0, "last": len(ct_files) - 1}[where]
    # Files in any order: the damaged one must be found wherever it sorts.
    files = _rewrite(ct_files, tmp_path / "series", {index: edit})[::-1]
    with pytest.raises(SeriesReadError) as caught:
        load_series(files)
    message = str(caught.value)
    assert _sop(files[len(files) - 1 - index]) in message, message
    assert words in message, message
    assert "damaged header" in message, message


@pytest.mark.parametrize(
    ("name", "edit", "words"),
    [c for c in ONE_SLICE if "position" not in c[0]],
    ids=[c[0] for c in ONE_SLICE if "position" not in c[0]],
)
def test_every_slice_damaged_alike_refuses_the_series(ct_files, tmp_path, name, edit, words):
    edits = dict.fromkeys(range(len(ct_files)), edit)
    files = _rewrite(ct_files, tmp_path / "series", edits)
    with pytest.raises(SeriesReadError) as caught:
        load_series(files)
    assert words in str(caught.value), str(caught.value)
    assert _sop(files[0]) in str(caught.value) or "more image" in str(caught.value)


def test_a_damaged_localizer_of_another_matrix_is_only_left_out(ct_files, tmp_path):
    """A header damaged in an image that cannot be part of the main stack (another Rows x
    Columns) does not block the series: it is left out, and the reason says what."""
    intact = load_series(ct_files)
    files = _rewrite(ct_files, tmp_path / "series", {})
    scout = pydicom.dcmread(ct_files[0])
    scout.SOPInstanceUID = pydicom.uid.generate_uid()
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.Rows, scout.Columns = 16, 16
    scout.PixelData = b"\0\0" * 16 * 16
    scout.ImagePositionPatient = ["nan", "0", "0"]
    scout.save_as(tmp_path / "series" / "scout.dcm", enforce_file_format=False)
    volume = load_series([*files, tmp_path / "series" / "scout.dcm"])
    assert volume.shape == intact.shape
    assert (volume.array == intact.array).all()
    assert any(
        "16x16 with a damaged header" in line and "not a finite" in line for line in volume.left_out
    ), volume.left_out


@pytest.mark.parametrize("where", ["middle", "first", "last"])
@pytest.mark.parametrize("keyword", ["ImagePositionPatient", "ImageOrientationPatient"])
def test_a_slice_with_half_its_image_plane_is_damaged(ct_files, tmp_path, where, keyword):
    """ImagePositionPatient without ImageOrientationPatient or the other way round (Type 1
    together for a CT image): the slice cannot be placed. At the edge of the stack it
    used to be left out silently (one slice fewer); now the series is refused naming it."""
    index = {"middle": len(ct_files) // 2, "first": 0, "last": len(ct_files) - 1}[where]
    files = _rewrite(ct_files, tmp_path / "series", {index: _delete(keyword)})
    with pytest.raises(SeriesReadError) as caught:
        load_series(files)
    message = str(caught.value)
    assert f"instance {_sop(files[index])}: {keyword} is missing: damaged header" in message


def test_a_slice_without_image_plane_is_named_in_the_gap_it_leaves(ct_files, tmp_path):
    """Neither attribute (what a dose screen looks like): not an image of a stack; in the
    middle of the stack it leaves a gap, and the refusal names it as a likely cause."""
    middle = len(ct_files) // 2

    def strip(ds: Dataset) -> None:
        del ds.ImagePositionPatient, ds.ImageOrientationPatient

    files = _rewrite(ct_files, tmp_path / "series", {middle: strip})
    with pytest.raises(SeriesReadError) as caught:
        load_series(files)
    message = str(caught.value)
    assert "uneven slice spacing" in message
    lacking = "lacks ImagePositionPatient or ImageOrientationPatient (damaged headers?)"
    assert f"{lacking}, e.g. instance {_sop(files[middle])}" in message, message


@pytest.mark.parametrize(
    "iop",
    [
        AXIAL,
        [1, -0.0, 0, 0, 1, -0.0],  # negative zeros
        [0.9999, 0.0141, 0, -0.0141, 0.9999, 0],  # 4 decimals, rotated 0.8 degrees
        [0.70710678, 0.70710678, 0, 0, 0, -1],  # oblique to 8 decimals
        [0.707, 0.707, 0, 0, 0, -1],  # oblique to 3 decimals (length 0.99985)
        [0.7, 0.7, 0, -0.7, 0.7, 0],  # oblique to 1 decimal (length 0.98995)
        [0.866025, 0, -0.5, 0, 1, 0],  # 30 degrees about y, 6 decimals
    ],
)
def test_cosines_as_scanners_round_them_are_not_damage(iop):
    assert geometry_problem([float(v) for v in iop], [0.0, 0.0, 0.0], [0.7, 0.7]) is None
    info = slice_info(image(0.0, iop=iop))
    assert info.stack_key is not None and not info.stack_key.startswith(DAMAGED)
    assert info.position_mm is not None and math.isfinite(info.position_mm)


@pytest.mark.parametrize(
    ("iop", "ipp", "spacing"),
    [
        (AXIAL, [0, 0, float("nan")], [0.7, 0.7]),
        (AXIAL, [0, 0, 0], [0.7, float("inf")]),
        ([1, 0, 0, 0, 0.94, 0], [0, 0, 0], [0.7, 0.7]),  # column 6 % short
        ([1, 0, 0, 0.02, 1, 0], [0, 0, 0], [0.7, 0.7]),  # 1.1 degrees off perpendicular
    ],
)
def test_damage_just_past_the_tolerance_is_named(iop, ipp, spacing):
    problem = geometry_problem(iop, ipp, spacing)
    assert problem is not None
    ds = image(0.0, iop=iop)
    ds.ImagePositionPatient, ds.PixelSpacing = [str(v) for v in ipp], [str(v) for v in spacing]
    key = slice_info(ds).stack_key
    assert key == f"{DAMAGED} - 64x64 - {problem}"
    assert len(key) <= 160  # db.models.Instance.stack_key


def _encoded(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "edit", "words"),
    [c for c in ONE_SLICE if "rescale" not in c[0]],
    ids=[c[0] for c in ONE_SLICE if "rescale" not in c[0]],
)
def test_the_receive_path_stores_the_same_verdict(ct_files, name, edit, words):
    """``parse_header`` (what the listener stores per instance, from the element bytes)
    and ``slice_info`` on the pydicom data set agree: the stack key names the damage."""
    ds = pydicom.dcmread(ct_files[3])
    edit(ds)
    key = parse_header(_encoded(ds)).stack_key
    assert key is not None and key.startswith(f"{DAMAGED} - 32x32 - "), key
    assert key == slice_info(ds).stack_key
    assert words in key or words == "damaged header"


def test_routing_attributes_say_damaged_not_localizer(ct_files, tmp_path):
    """Every image damaged: no main stack, and the series is not passed off as
    localizers (routing and ``route explain`` read ``ImageKind``)."""
    edits = dict.fromkeys(range(len(ct_files)), _set("PixelSpacing", [0, 0]))
    files = _rewrite(ct_files, tmp_path / "series", edits)
    attrs = from_files(files)
    assert attrs["ImageKind"] == DAMAGED
    assert any("PixelSpacing 0\\0 mm is not positive" in line for line in attrs["LeftOut"]), attrs[
        "LeftOut"
    ]


def test_an_intact_series_reads_as_before(ct_files):
    volume = stack_geometry(load_series(ct_files))
    assert volume.shape == (SIZE["slices"], 32, 32)
    assert volume.spacing_zyx[1:] == (12.0, 12.0)
    assert all(math.isfinite(v) for v in (*volume.origin_lps, *volume.direction))
    assert volume.left_out == []


def test_stack_geometry_refuses_a_position_that_is_not_finite(ct_files):
    """Defence in depth: ``stack_geometry`` never builds an affine from NaN, even for
    headers that did not come through the stack choice."""
    volume = load_series(ct_files)
    volume.headers[2] = volume.headers[2].copy()
    volume.headers[2].ImagePositionPatient = ["0", "nan", "0"]
    with pytest.raises(StackGeometryError, match="not finite"):
        stack_geometry(volume)
