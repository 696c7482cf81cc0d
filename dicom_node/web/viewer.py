"""The result viewer: the source series with a SEG or RTSTRUCT overlaid, slice by slice.

Rendered on the server, so the browser needs no DICOM code and nothing from a CDN: a
result and its source are read once (``load``) into a CT volume (HU) and a label volume
in the source's slice order, kept for the last few results viewed, and each slice is a
PNG (``render_slice``) in the colours the PACS will show: a SEG's
RecommendedDisplayCIELabValue (PS3.3 C.8.20.2, converted from the scaled CIELab of
PS3.3 C.10.7.1.1 to sRGB) and an RTSTRUCT's ROIDisplayColor (PS3.3 C.8.8.8). Labels are
filled half-transparent with a full-colour outline, so small structures stay visible.

The default slice shows the smallest label present (a tumour rather than the kidney
around it) where it is largest. Each label's volume is counted on the source grid (mL).
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image, ImageDraw

from inference.pixels import PixelDataError, check_files

# The abdomen window (soft tissue): what a radiologist reads kidneys and tumours in.
WINDOWS: dict[str, tuple[float, float]] = {"abdomen": (400.0, 40.0)}  # name -> (W, L)
DEFAULT_WINDOW = "abdomen"
FILL_ALPHA = 0.4
# Colours for segments without a display colour (none of ours: the registry names one).
FALLBACK_COLOURS = [(230, 60, 60), (60, 200, 90), (70, 120, 240), (240, 200, 40), (200, 80, 220)]
CACHE_SIZE = 2  # volumes kept in memory (a 512 x 512 x 300 series is ~230 MB)


class ViewerError(LookupError):
    """No view can be made (the result's file or its source series is missing)."""


class SourceUnreadableError(ViewerError):
    """The source series' pixel data cannot be decoded as its headers declare."""


@dataclass(frozen=True)
class Segment:
    """One label of a result: its number in ``labels``, name, colour (sRGB), size."""

    number: int
    name: str
    rgb: tuple[int, int, int]
    voxels: int
    volume_ml: float
    best_slice: int | None  # the slice where it covers the most pixels


@dataclass
class ResultVolume:
    """A result over its source: ``hu`` and ``labels`` are [z, y, x] in the source's slice
    order (along the slice normal); ``labels`` holds segment numbers (0 = none)."""

    kind: str  # SEG or RTSTRUCT
    hu: np.ndarray
    labels: np.ndarray
    segments: list[Segment]
    source_sop_uids: list[str]
    positions_mm: list[float]
    default_slice: int
    voxel_ml: float
    notes: list[str] = field(default_factory=list)

    @property
    def slices(self) -> int:
        return int(self.hu.shape[0])

    def legend(self) -> list[dict[str, Any]]:
        return [
            {
                "number": s.number,
                "name": s.name,
                "rgb": list(s.rgb),
                "hex": "#{:02x}{:02x}{:02x}".format(*s.rgb),
                "volume_ml": round(s.volume_ml, 2),
                "present": s.voxels > 0,
                "best_slice": s.best_slice,
            }
            for s in self.segments
        ]


# -- colours ------------------------------------------------------------------------------


def cielab_to_rgb(value: Any) -> tuple[int, int, int]:
    """sRGB of a DICOM scaled CIELab triplet (PS3.3 C.10.7.1.1: L 0..65535 -> 0..100,
    a and b 0..65535 -> -128..127), as highdicom converts it when writing.

    Raises ``ValueError`` for a value that is not three integers in 0..65535.
    """
    from highdicom.color import CIELabColor  # only the viewer needs it

    numbers = [int(v) for v in value]
    if len(numbers) != 3 or not all(0 <= v <= 65535 for v in numbers):
        raise ValueError(f"CIELab value {list(value)!r} is not three integers in 0..65535")
    rgb = CIELabColor.from_dicom_value(tuple(numbers)).to_rgb()
    return (int(rgb[0]), int(rgb[1]), int(rgb[2]))


def _fallback(number: int) -> tuple[int, int, int]:
    return FALLBACK_COLOURS[(number - 1) % len(FALLBACK_COLOURS)]


# -- reading ------------------------------------------------------------------------------


def _normal(ds: pydicom.Dataset) -> np.ndarray:
    iop = [float(v) for v in getattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
    return np.cross(np.array(iop[:3]), np.array(iop[3:]))


def _position(ds: pydicom.Dataset, normal: np.ndarray) -> float:
    ipp = getattr(ds, "ImagePositionPatient", None)
    if ipp is None:
        return float(getattr(ds, "InstanceNumber", 0) or 0)
    return float(np.dot(np.array([float(v) for v in ipp]), normal))


def _referenced_uids(result: pydicom.Dataset) -> list[str]:
    """The source SOP Instance UIDs a SEG or RTSTRUCT references ([] when none)."""
    uids: list[str] = []
    if result.Modality == "SEG":
        for item in getattr(result, "ReferencedSeriesSequence", []):
            uids += [str(i.ReferencedSOPInstanceUID) for i in item.ReferencedInstanceSequence]
    else:
        for frame in getattr(result, "ReferencedFrameOfReferenceSequence", []):
            for study in getattr(frame, "RTReferencedStudySequence", []):
                for series in getattr(study, "RTReferencedSeriesSequence", []):
                    uids += [
                        str(i.ReferencedSOPInstanceUID)
                        for i in getattr(series, "ContourImageSequence", [])
                    ]
    return list(dict.fromkeys(uids))


def _source(source_paths: list[str], wanted: list[str]) -> tuple[list[str], list[Any]]:
    """The source files the result refers to, sorted along the slice normal, and their
    headers; all source files when the result names none that are there."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in source_paths]
    chosen = [i for i, h in enumerate(headers) if str(h.SOPInstanceUID) in set(wanted)]
    if not chosen:
        chosen = list(range(len(headers)))
    if not chosen:
        raise ViewerError("the source series has no instances")
    normal = _normal(headers[chosen[0]])
    chosen.sort(key=lambda i: _position(headers[i], normal))
    return [source_paths[i] for i in chosen], [headers[i] for i in chosen]


def _hu(paths: list[str], headers: list[Any]) -> np.ndarray:
    try:
        # The whole source stack, as the volume reader checks it: a result over damaged
        # pixel data is not shown as if it were sound.
        check_files(paths, headers)
    except PixelDataError as exc:
        raise SourceUnreadableError(f"the source series is damaged: {exc}") from exc
    planes = []
    for path, header in zip(paths, headers, strict=True):
        try:
            ds = pydicom.dcmread(path)
            stored = ds.pixel_array
        except Exception as exc:  # a decoder refusing what the check let through
            raise SourceUnreadableError(
                f"the source instance {header.SOPInstanceUID} ({path}) cannot be decoded: {exc}"
            ) from exc
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
        planes.append(np.clip(stored.astype(np.float32) * slope + intercept, -32768, 32767))
    shapes = {p.shape for p in planes}
    if len(shapes) != 1:
        raise SourceUnreadableError(f"the source slices differ in size: {sorted(shapes)}")
    return np.stack(planes).astype(np.int16)


def _seg_labels(
    seg: pydicom.Dataset, uids: list[str], shape: tuple[int, ...]
) -> tuple[np.ndarray, list[tuple[int, str, tuple[int, int, int]]]]:
    from inference.seg_reader import seg_label_map

    labels, names = seg_label_map(seg, uids)
    if labels.shape != shape:
        raise ViewerError(f"the SEG's frames ({labels.shape}) do not fit the source {shape}")
    segments = []
    for item in seg.SegmentSequence:
        number = int(item.SegmentNumber)
        lab = getattr(item, "RecommendedDisplayCIELabValue", None)
        try:
            rgb = cielab_to_rgb(lab) if lab is not None else _fallback(number)
        except ValueError:
            rgb = _fallback(number)
        segments.append((number, names.get(number, str(item.SegmentLabel)), rgb))
    return labels, segments


def _rt_labels(
    rt: pydicom.Dataset, uids: list[str], headers: list[Any], shape: tuple[int, ...]
) -> tuple[np.ndarray, list[tuple[int, str, tuple[int, int, int]]]]:
    """RTSTRUCT contours filled on the source slices (ROI i -> label i in ROI order)."""
    names = {
        int(r.ROINumber): str(getattr(r, "ROIName", r.ROINumber))
        for r in getattr(rt, "StructureSetROISequence", [])
    }
    labels = np.zeros(shape, np.uint8)
    index = {uid: z for z, uid in enumerate(uids)}
    normal = _normal(headers[0])
    positions = np.array([_position(h, normal) for h in headers])
    segments = []
    for number, roi in enumerate(getattr(rt, "ROIContourSequence", []), start=1):
        roi_number = int(roi.ReferencedROINumber)
        colour = getattr(roi, "ROIDisplayColor", None)
        rgb = tuple(int(v) for v in colour) if colour is not None else _fallback(number)
        segments.append((number, names.get(roi_number, str(roi_number)), rgb))
        for contour in getattr(roi, "ContourSequence", []):
            points = np.array([float(v) for v in contour.ContourData]).reshape(-1, 3)
            refs = getattr(contour, "ContourImageSequence", [])
            z = index.get(str(refs[0].ReferencedSOPInstanceUID)) if refs else None
            if z is None:
                z = int(np.argmin(np.abs(positions - float(np.dot(points[0], normal)))))
            h = headers[z]
            origin = np.array([float(v) for v in h.ImagePositionPatient])
            iop = [float(v) for v in h.ImageOrientationPatient]
            row_mm, col_mm = (float(v) for v in h.PixelSpacing)
            cols = (points - origin) @ np.array(iop[:3]) / col_mm
            rows = (points - origin) @ np.array(iop[3:]) / row_mm
            mask = Image.new("L", (shape[2], shape[1]), 0)
            ImageDraw.Draw(mask).polygon(list(zip(cols, rows, strict=True)), fill=1, outline=1)
            labels[z][np.asarray(mask, bool)] = number
    return labels, segments


def load(result_path: str, source_paths: list[str]) -> ResultVolume:
    """Read a SEG or RTSTRUCT and its source series into a ``ResultVolume``.

    Raises ``ViewerError`` when the files are missing or do not fit together, and
    ``SourceUnreadableError`` (naming the instance) when the source is damaged.
    """
    if not Path(result_path).exists():
        raise ViewerError(f"the result file {result_path} is gone")
    if not source_paths:
        raise ViewerError("the source series' files are gone")
    result = pydicom.dcmread(result_path)
    paths, headers = _source(source_paths, _referenced_uids(result))
    uids = [str(h.SOPInstanceUID) for h in headers]
    hu = _hu(paths, headers)
    if result.Modality == "SEG":
        labels, described = _seg_labels(result, uids, hu.shape)
        kind = "SEG"
    elif result.Modality == "RTSTRUCT":
        labels, described = _rt_labels(result, uids, headers, hu.shape)
        kind = "RTSTRUCT"
    else:
        raise ViewerError(f"a {result.Modality} result cannot be shown")
    normal = _normal(headers[0])
    positions = [_position(h, normal) for h in headers]
    row_mm, col_mm = (float(v) for v in getattr(headers[0], "PixelSpacing", [1, 1]))
    steps = np.diff(positions)
    slice_mm = (
        float(np.median(np.abs(steps)))
        if len(steps)
        else float(getattr(headers[0], "SliceThickness", 1) or 1)
    )
    voxel_ml = row_mm * col_mm * slice_mm / 1000.0
    counts = np.bincount(labels.ravel(), minlength=max([n for n, _, _ in described] + [0]) + 1)
    per_slice = labels.reshape(labels.shape[0], -1)
    segments = []
    for number, name, rgb in described:
        voxels = int(counts[number]) if number < len(counts) else 0
        best = int(np.argmax((per_slice == number).sum(axis=1))) if voxels else None
        segments.append(Segment(number, name, rgb, voxels, voxels * voxel_ml, best))
    present = [s for s in segments if s.voxels]
    smallest = min(present, key=lambda s: s.voxels) if present else None
    default = (
        smallest.best_slice
        if smallest and smallest.best_slice is not None
        else (labels.shape[0] // 2)
    )
    return ResultVolume(kind, hu, labels, segments, uids, positions, int(default), voxel_ml)


# -- drawing ------------------------------------------------------------------------------


def _outline(mask: np.ndarray) -> np.ndarray:
    """The pixels of ``mask`` with a 4-neighbour outside it."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def render_slice(
    volume: ResultVolume, z: int, overlay: bool = True, window: str = DEFAULT_WINDOW
) -> bytes:
    """PNG of slice ``z``: the CT in ``window`` with the labels filled and outlined.

    Raises ``IndexError`` for a slice outside the volume, ``KeyError`` for an unknown
    window name.
    """
    if not 0 <= z < volume.slices:
        raise IndexError(f"slice {z} is outside 0..{volume.slices - 1}")
    width, level = WINDOWS[window]
    low = level - width / 2
    grey = np.clip((volume.hu[z].astype(np.float32) - low) / width * 255.0, 0, 255)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if overlay:
        plane = volume.labels[z]
        for segment in volume.segments:
            mask = plane == segment.number
            if not mask.any():
                continue
            colour = np.array(segment.rgb, np.float32)
            rgb[mask] = (1 - FILL_ALPHA) * rgb[mask] + FILL_ALPHA * colour
            rgb[_outline(mask)] = colour
    buf = io.BytesIO()
    Image.fromarray(np.rint(rgb).astype(np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


# -- the last few volumes viewed ----------------------------------------------------------


class VolumeCache:
    """The ``ResultVolume`` of the last ``size`` results viewed, by SOP Instance UID
    (which changes whenever a result's content does)."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self._items: OrderedDict[str, ResultVolume] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, sop_uid: str, result_path: str, source_paths: list[str]) -> ResultVolume:
        with self._lock:
            if sop_uid in self._items:
                self._items.move_to_end(sop_uid)
                return self._items[sop_uid]
        volume = load(result_path, source_paths)  # outside the lock: may take seconds
        with self._lock:
            self._items[sop_uid] = volume
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return volume
