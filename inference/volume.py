"""Reading a DICOM series once into an array + geometry.

The series' main image stack is chosen first (``inference.stacks``: localizers, reformats
and other acquisitions sharing the SeriesInstanceUID are left out, with the reason).
Slices are sorted by their position along the slice normal (never by file name or
InstanceNumber), checked for even spacing, then decoded by
SimpleITK/GDCM (which handles JPEG, JPEG-LS, JPEG 2000 and RLE) in exactly that order, so
``array[z]`` is the pixel data of ``files[z]`` and ``headers[z]``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom

from inference.pixels import PixelDataError, check_files
from inference.stacks import (
    DAMAGED,
    KIND_RANK,
    NON_IMAGE,
    POSITION_TOLERANCE_MM,
    StackChoice,
    choose,
    ds_float,
    image_kind,
    slice_info,
)

# SimpleITK is imported where images are decoded or resampled, not here: the node process
# (receive, route, web) imports this module for its types and errors and runs without it.
if TYPE_CHECKING:
    import SimpleITK as sitk


class SeriesReadError(ValueError):
    """The series cannot be read as one 3D volume; the message says why."""


@dataclass
class Volume:
    """A scalar volume in LPS patient space; ``array`` is [z, y, x] in HU."""

    array: np.ndarray
    spacing_zyx: tuple[float, float, float]
    origin_lps: tuple[float, float, float]
    direction: tuple[float, ...]  # 3x3 row-major, SimpleITK convention (columns = axes)
    series_uid: str = ""
    files: list[str] = field(default_factory=list)
    headers: list[pydicom.Dataset] = field(default_factory=list)
    # Images of the series that are not part of this volume, and why (localizers, ...).
    left_out: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    @cached_property
    def digest(self) -> str:
        """A fingerprint of the voxels and the grid: the same digest means the same image.

        Results are cached under it, not under a name: a NIfTI path rewritten with a new
        image, or a series that gained slices, never gets an old label map back.
        """
        h = hashlib.blake2b(digest_size=16)
        grid = (self.shape, self.spacing_zyx, self.origin_lps, self.direction, self.array.dtype.str)
        h.update(repr(grid).encode())
        h.update(np.ascontiguousarray(self.array).data)
        return h.hexdigest()

    def to_sitk(self, array: np.ndarray | None = None) -> sitk.Image:
        """This geometry around ``array`` (default: the image itself)."""
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(self.array if array is None else array)
        img.SetSpacing(tuple(reversed(self.spacing_zyx)))
        img.SetOrigin(self.origin_lps)
        img.SetDirection(self.direction)
        return img

    @classmethod
    def from_sitk(cls, img: sitk.Image, **extra: object) -> Volume:
        import SimpleITK as sitk

        return cls(
            array=sitk.GetArrayFromImage(img).astype(np.float32, copy=False),
            spacing_zyx=tuple(reversed(img.GetSpacing())),  # type: ignore[arg-type]
            origin_lps=tuple(img.GetOrigin()),  # type: ignore[arg-type]
            direction=tuple(img.GetDirection()),
            **extra,  # type: ignore[arg-type]
        )


def select_stack(
    files: Sequence[str | Path],
) -> tuple[list[str], list[pydicom.Dataset], list[str]]:
    """The series' main image stack (``inference.stacks``), sorted along the slice normal
    and checked to form one volume: ``(files, headers, left_out)``, where ``left_out`` says
    which other images of the series were not used, and why.

    Raises ``SeriesReadError`` when no stack can be segmented (only localizers or images
    without geometry), for multi-frame images, for two slices at one position and for
    uneven slice spacing (missing slices).
    """
    if not files:
        raise SeriesReadError("no files")
    all_headers = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in files]
    choice = choose([slice_info(h) for h in all_headers])
    _refuse_damaged(choice, all_headers)
    if choice.main is None:
        raise SeriesReadError("no image stack to segment: " + "; ".join(choice.left_out_text()))
    kept = choice.main.members  # sorted along the slice normal
    headers = [all_headers[i] for i in kept]
    first = headers[0]
    for h in headers:
        problem = rescale_problem(h)
        if problem:
            raise SeriesReadError(
                f"instance {h.get('SOPInstanceUID', '?')}: {problem}: damaged header"
            )
        frames = h.get("NumberOfFrames")
        try:
            count = int(frames) if frames not in (None, "") else 1
        except (TypeError, ValueError):
            raise SeriesReadError(
                f"instance {h.get('SOPInstanceUID', '?')}: NumberOfFrames {frames!r} is not "
                "a number: damaged header"
            ) from None
        if count not in (0, 1):
            raise SeriesReadError(
                f"instance {h.get('SOPInstanceUID', '?')} is multi-frame: multi-frame images "
                "are not supported as model input"
            )
    iop = np.array(first.ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    positions = np.array([np.dot(normal, np.array(h.ImagePositionPatient, float)) for h in headers])
    if len(positions) > 1:
        gaps = np.diff(positions)
        if np.any(gaps < POSITION_TOLERANCE_MM):
            at = int(np.argmin(gaps))
            raise SeriesReadError(
                f"instances {headers[at].get('SOPInstanceUID', '?')} and "
                f"{headers[at + 1].get('SOPInstanceUID', '?')} lie at one position "
                f"({positions[at]:.2f} mm): duplicate or mixed acquisitions"
            )
        usual = float(np.median(gaps))
        if np.max(np.abs(gaps - usual)) > max(0.01, 0.01 * usual):
            at = int(np.argmax(np.abs(gaps - usual)))
            raise SeriesReadError(
                f"uneven slice spacing ({gaps.min():.3f}..{gaps.max():.3f} mm, usual "
                f"{usual:.3f}): {gaps[at]:.3f} mm between instances "
                f"{headers[at].get('SOPInstanceUID', '?')} and "
                f"{headers[at + 1].get('SOPInstanceUID', '?')}: missing slices?"
                + _without_geometry(choice, all_headers, first)
            )
    return [str(files[i]) for i in kept], headers, choice.left_out_text()


def _refuse_damaged(choice: StackChoice, headers: Sequence[pydicom.Dataset]) -> None:
    """Raise ``SeriesReadError`` naming the first damaged image (``inference.stacks``
    DAMAGED) that may belong to the series' main stack: one with the main stack's Rows x
    Columns and SOP Class, whose ImageType does not keep it out of that stack (a
    localizer never is in it, a DERIVED image not in an ORIGINAL one); any when there is
    no main stack. Its slice would be missing from the volume (a gap, or an edge slice
    silently lost), and a header with one unusable value cannot be trusted for the
    others."""
    main = choice.main
    main_class = headers[main.members[0]].get("SOPClassUID") if main is not None else None

    def may_belong(h: pydicom.Dataset) -> bool:
        assert main is not None
        rank = KIND_RANK[image_kind(h.get("ImageType"))]
        return h.get("SOPClassUID") == main_class and rank <= KIND_RANK[main.kind]

    for stack, _ in choice.left_out:
        if stack.kind != DAMAGED or (main is not None and stack.matrix != main.matrix):
            continue
        suspects = [i for i in stack.members if main is None or may_belong(headers[i])]
        if suspects:
            first = headers[suspects[0]]
            others = len(suspects) - 1
            more = f" (and {others} more image{'s' if others != 1 else ''})" if others else ""
            raise SeriesReadError(
                f"instance {first.get('SOPInstanceUID', '?')}{more}: {stack.damage}: "
                "damaged header, its pixels cannot be placed in patient space"
            )


def _without_geometry(
    choice: StackChoice, headers: Sequence[pydicom.Dataset], first: pydicom.Dataset
) -> str:
    """For a gap in the main stack: the images of the main stack's SOP Class and matrix
    that lack ImagePositionPatient or ImageOrientationPatient (Type 1 for CT and MR
    images, PS3.3 C.7.6.2), which may be the missing slices."""
    matrix = (first.get("Rows"), first.get("Columns"))
    lacking = [
        headers[i]
        for stack, _ in choice.left_out
        if stack.kind == NON_IMAGE
        for i in stack.members
        if headers[i].get("SOPClassUID") == first.get("SOPClassUID")
        and (headers[i].get("Rows"), headers[i].get("Columns")) == matrix
    ]
    if not lacking:
        return ""
    count = len(lacking)
    return (
        f"; {count} image{'s' if count != 1 else ''} of the same SOP Class and matrix "
        f"{'lack' if count != 1 else 'lacks'} ImagePositionPatient or "
        "ImageOrientationPatient (damaged headers?), "
        f"e.g. instance {lacking[0].get('SOPInstanceUID', '?')}"
    )


def rescale_problem(ds: pydicom.Dataset) -> str | None:
    """Why RescaleSlope / RescaleIntercept cannot turn stored values into HU, or None
    (absent means slope 1, intercept 0; a slope of 0 maps every pixel to one value;
    PS3.3 C.11.1.1.2)."""
    values = []
    for keyword, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        raw = ds.get(keyword)
        try:
            value = ds_float(raw) if raw not in (None, "") else default
        except (TypeError, ValueError):
            return f"{keyword} {raw!r} is not a number"
        if not math.isfinite(value):
            return f"{keyword} {value:g} is not a finite number"
        values.append(value)
    slope, intercept = values
    if slope == 0:
        return "RescaleSlope is 0"
    # The volume is float32: a stored value (below 2 ** BitsStored) must stay finite.
    try:
        bits = min(int(ds.get("BitsStored") or 16), 64)
    except (TypeError, ValueError):
        bits = 16
    if abs(slope) * 2.0**bits + abs(intercept) > float(np.finfo(np.float32).max):
        return (
            f"RescaleSlope {slope:g} and RescaleIntercept {intercept:g} give values beyond "
            "32-bit floating point"
        )
    return None


def _slice_thickness(header: pydicom.Dataset) -> float:
    """SliceThickness (mm) as the z spacing of a one-slice volume: 1 when absent, empty
    or 0 (Type 2); ``SeriesReadError`` when it is not a finite number or negative."""
    raw = header.get("SliceThickness")
    try:
        thickness = ds_float(raw) if raw not in (None, "") else 0.0
    except (TypeError, ValueError):
        thickness = math.nan
    if not math.isfinite(thickness) or thickness < 0:
        raise SeriesReadError(
            f"instance {header.get('SOPInstanceUID', '?')}: SliceThickness {raw!r} is not a "
            "positive number: damaged header, the slice has no thickness to place it with"
        )
    return thickness or 1.0


def sort_slices(files: Sequence[str | Path]) -> tuple[list[str], list[pydicom.Dataset]]:
    """``select_stack`` without the left-out list: the main stack's files and headers."""
    sorted_files, headers, _ = select_stack(files)
    return sorted_files, headers


def load_series(files: Sequence[str | Path], series_uid: str = "") -> Volume:
    """Read a series once: sorted headers (for writers) + decoded HU array + geometry.

    Raises ``SeriesReadError`` naming the instance (SOP Instance UID and file) when an
    image's pixel data cannot be decoded to the geometry its header declares
    (``inference.pixels``) or GDCM cannot decode it.
    """
    try:
        sorted_files, headers, left_out = select_stack(files)
    except SeriesReadError as exc:
        # A damaged header (Rows rewritten, say) can split a slice off the stack and
        # leave a gap: name the damaged instance rather than the gap.
        _check_pixels([str(f) for f in files], [None] * len(files), False, cause=exc)
        raise
    thickness = _slice_thickness(headers[0]) if len(sorted_files) == 1 else None
    # Before any decoder sees the files (GDCM reads short pixel data without a word and
    # some damaged frames kill the process), and for the images left out of the stack
    # too: one whose pixel data contradicts its header makes the whole series suspect.
    _check_pixels(sorted_files, headers, True)
    kept = set(sorted_files)
    others = [str(f) for f in files if str(f) not in kept]
    _check_pixels(others, [None] * len(others), False)
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sorted_files)
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        raise SeriesReadError(_undecodable(sorted_files, headers, exc)) from exc
    _check_decoded(img, headers)
    if thickness is not None:  # SimpleITK gives a 2D-like volume with spacing 1 on z
        img.SetSpacing((*img.GetSpacing()[:2], thickness))
    return Volume.from_sitk(
        img,
        series_uid=series_uid or str(headers[0].SeriesInstanceUID),
        files=sorted_files,
        headers=headers,
        left_out=left_out,
    )


def _check_pixels(
    files: Sequence[str],
    headers: Sequence[pydicom.Dataset | None],
    model_input: bool,
    cause: Exception | None = None,
) -> None:
    """``inference.pixels.check_files`` as a ``SeriesReadError``."""
    try:
        check_files(files, headers, model_input)
    except PixelDataError as exc:
        raise SeriesReadError(f"pixel data does not match the header: {exc}") from (cause or exc)


def _undecodable(files: Sequence[str], headers: Sequence[pydicom.Dataset], exc: Exception) -> str:
    """Why GDCM could not decode the series, naming the instances it fails on.

    The series reader's error names no file; each file is decoded alone to find them
    (only on this error path).
    """
    import SimpleITK as sitk

    failed: list[str] = []
    for path, header in zip(files, headers, strict=True):
        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        try:
            reader.Execute()
        except RuntimeError as one:
            lines = [x.strip() for x in str(one).splitlines() if x.strip()]
            reason = lines[-1] if lines else "unknown error"
            syntax = getattr(header.get("file_meta", None), "TransferSyntaxUID", None)
            kind = f"its {syntax.name} " if syntax is not None else "its "
            failed.append(
                f"instance {header.get('SOPInstanceUID', '?')} ({path}): GDCM cannot decode "
                f"{kind}pixel data, the frame is damaged ({reason})"
            )
    if not failed:
        return f"pixel data cannot be decoded: {exc}"
    more = f"; {len(failed) - 1} more of the {len(files)} instances too" if len(failed) > 1 else ""
    return f"pixel data cannot be decoded: {failed[0]}{more}"


def _check_decoded(img: sitk.Image, headers: Sequence[pydicom.Dataset]) -> None:
    """The decoded volume has the declared size: Columns x Rows x slices, one component."""
    first = headers[0]
    expected = (int(first.Columns), int(first.Rows), len(headers))
    size = tuple(img.GetSize()) + (1,) * (3 - img.GetDimension())
    if size != expected or img.GetNumberOfComponentsPerPixel() != 1:
        raise SeriesReadError(
            f"pixel data decodes to {size[0]} x {size[1]} x {size[2]} with "
            f"{img.GetNumberOfComponentsPerPixel()} components, not the declared "
            f"{expected[0]} x {expected[1]} x {expected[2]} greyscale volume"
        )


def resample_to(moving: Volume, reference: Volume, default_hu: float = -1024.0) -> np.ndarray:
    """``moving`` resampled (linear) into ``reference``'s grid; returns the array."""
    import SimpleITK as sitk

    out = sitk.Resample(
        moving.to_sitk(),
        reference.to_sitk(),
        sitk.Transform(),
        sitk.sitkLinear,
        default_hu,
        sitk.sitkFloat32,
    )
    return sitk.GetArrayFromImage(out)
