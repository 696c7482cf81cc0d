"""Image stacks inside one series, and which one is the series' main stack.

A SeriesInstanceUID does not always hold one image stack: scanners and PACS put
localizers, a second orientation, reformats (DERIVED/SECONDARY), other matrix sizes or
pixel spacings, dose screens and repeated acquisitions under the same UID. Before a series
is classified or segmented its instances are grouped into stacks of images that can form
one volume, and one stack is chosen; the rest is recorded as left out, with the reason.

Grouping (``stack_key``): images share a stack when they have the same kind (LOCALIZER,
ORIGINAL or DERIVED, from ImageType), the same ImageOrientationPatient (to 1e-3, keys one
rounding step apart joined: ``merged_keys``), the same
Rows x Columns and the same PixelSpacing (to 0.01 mm). Within a stack, slice positions
that repeat (bolus tracking images, a repeated scan of the same range) split it by
AcquisitionNumber when that separates them.

An image whose geometry is present but unusable (a value that is not a finite number,
direction cosines that are not perpendicular unit vectors, a PixelSpacing that is missing
or not positive: PS3.3 C.7.6.2.1.1) is DAMAGED: never part of a stack, whatever else it
shares with one (``geometry_problem``).

Choice (``choose_main``), in this order, so the result never depends on the order of
arrival: never a localizer; ORIGINAL before DERIVED; axial before other orientations; more
images; finer slice spacing; then the smallest key.

The same functions run on headers read from files (the volume reader) and on the stack
fields the receive path stores per instance (routing), so both pick the same stack.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

NON_IMAGE = "NON-IMAGE"
DAMAGED = "DAMAGED"
KIND_RANK = {"ORIGINAL": 0, "DERIVED": 1, "LOCALIZER": 2, NON_IMAGE: 3, DAMAGED: 4}
_ORIENTATION_RANK = {"axial": 0, "coronal": 1, "sagittal": 1, "oblique": 2}
POSITION_TOLERANCE_MM = 1e-3
# Direction cosines as scanners write them (6-16 significant digits, some rounded to 4
# decimals, a few to 1: 0.7 for 0.7071) are perpendicular to well within this; a damaged
# or hand-edited header is not. Their length matters less (every reader normalises them)
# and rounding to one decimal leaves it 1 % off, so it has more room.
PERPENDICULAR_TOLERANCE = 0.01
UNIT_LENGTH_TOLERANCE = 0.05
# Stack keys hold the orientation to 3 decimals; values this close are one orientation
# (one rounding step, ~0.06 degrees, and float noise).
IOP_KEY_TOLERANCE = 0.0015
STACK_KEY_CHARS = 160  # db.models.Instance.stack_key


def _normal(iop: Sequence[float]) -> tuple[float, float, float]:
    """The slice normal, row x column direction of ImageOrientationPatient (plain floats:
    this runs for every received instance, where numpy's small-array overhead is ~10x)."""
    r0, r1, r2, c0, c1, c2 = (float(v) for v in iop[:6])
    return (r1 * c2 - r2 * c1, r2 * c0 - r0 * c2, r0 * c1 - r1 * c0)


def orientation_name(iop: Sequence[float]) -> str:
    """axial / coronal / sagittal / oblique from ImageOrientationPatient (6 values).

    Oblique when the slice normal is more than ~25 degrees off every main axis.
    """
    magnitudes = [abs(v) for v in _normal(iop)]
    axis = magnitudes.index(max(magnitudes))  # the first largest, as numpy's argmax
    if magnitudes[axis] < 0.9:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def image_kind(image_type: Any) -> str:
    """LOCALIZER, ORIGINAL or DERIVED from ImageType (PS3.3 C.7.6.1.1.2)."""
    values = (
        [str(v).strip().upper() for v in (image_type or [])]
        if not isinstance(image_type, str)
        else [v.strip().upper() for v in image_type.split("\\")]
    )
    if "LOCALIZER" in values:
        return "LOCALIZER"
    if values and values[0] == "DERIVED":
        return "DERIVED"
    return "ORIGINAL"


@dataclass(frozen=True)
class SliceInfo:
    """What stack grouping needs of one instance.

    ``stack_key`` None: not an image that can be part of a stack (no geometry).
    ``position_mm``: ImagePositionPatient projected on the slice normal.
    """

    stack_key: str | None
    position_mm: float | None = None
    acquisition: int | None = None
    instance_number: int | None = None


def ds_float(value: Any) -> float:
    """``float(value)`` for a DS value, refusing digit-grouping underscores: not a DS
    character (PS3.5 6.2), and ``1_2`` is 12 to Python but 1 to GDCM, which decodes the
    volume (a pydicom DSfloat keeps the text it was read from). Raises ``ValueError``."""
    text = getattr(value, "original_string", value)
    if isinstance(text, str) and "_" in text:
        raise ValueError(f"{text!r} is not a decimal string")
    return float(value)


def _floats(value: Any, count: int) -> list[float] | None:
    if isinstance(value, int | float):  # a multi-valued element holding one value
        value = [value]
    try:
        values = [ds_float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return values if len(values) == count else None


def _mm(value: float) -> str:
    """A length in a stack key: to 0.01 mm, in short exponent form when absurdly large,
    so the key fits ``STACK_KEY_CHARS`` (a damaged PixelSpacing of 1e300 is 300 digits)."""
    return f"{value:.2f}" if value < 1e6 else f"{value:.3e}"


def _absent(value: Any) -> bool:
    """None, or an element present with no value (pydicom gives "" or an empty list)."""
    return value is None or (hasattr(value, "__len__") and len(value) == 0)


def geometry_problem(
    iop: Sequence[float] | None,
    ipp: Sequence[float] | None,
    pixel_spacing: Sequence[float] | None,
) -> str | None:
    """Why an image's geometry cannot place its pixels in patient space, or None.

    ``iop``: ImageOrientationPatient (6 numbers or None when not 6 numbers), ``ipp``:
    ImagePositionPatient (3 or None), ``pixel_spacing``: PixelSpacing (2 or None), in mm.
    Problems: a value that is not a finite number; row or column direction cosines that
    are not unit vectors (``UNIT_LENGTH_TOLERANCE``) or not perpendicular
    (``PERPENDICULAR_TOLERANCE``) (PS3.3 C.7.6.2.1.1); PixelSpacing missing or not
    positive (Type 1 in the Image Plane Module, PS3.3 C.7.6.2); a position whose distance
    along the slice normal overflows.
    """
    for keyword, values, count in (
        ("ImageOrientationPatient", iop, 6),
        ("ImagePositionPatient", ipp, 3),
        ("PixelSpacing", pixel_spacing, 2),
    ):
        if values is None:
            return f"{keyword} is missing or not {count} numbers"
        if not all(math.isfinite(v) for v in values):
            shown = "\\".join(f"{v:g}" for v in values)
            return f"{keyword} {shown} has a value that is not a finite number"
    assert iop is not None and pixel_spacing is not None
    row, column = iop[:3], iop[3:6]
    lengths = [math.sqrt(sum(v * v for v in axis)) for axis in (row, column)]
    if any(abs(length - 1.0) > UNIT_LENGTH_TOLERANCE for length in lengths):
        return (
            "ImageOrientationPatient row and column are not unit vectors (lengths "
            f"{lengths[0]:.3f}, {lengths[1]:.3f})"
        )
    cosine = sum(r * c for r, c in zip(row, column, strict=True))
    if abs(cosine) > PERPENDICULAR_TOLERANCE:
        return f"ImageOrientationPatient row and column are not perpendicular (cosine {cosine:.3f})"
    if min(pixel_spacing) <= 0:
        return f"PixelSpacing {pixel_spacing[0]:g}\\{pixel_spacing[1]:g} mm is not positive"
    assert ipp is not None
    n0, n1, n2 = _normal(iop)
    if not math.isfinite(n0 * ipp[0] + n1 * ipp[1] + n2 * ipp[2]):  # each finite, the sum not
        shown = "\\".join(f"{v:g}" for v in ipp)
        return f"ImagePositionPatient {shown} is too far out to place"
    return None


def _damaged(
    rows: int, columns: int, problem: str, acquisition: int | None, number: int | None
) -> SliceInfo:
    """A DAMAGED image's SliceInfo: ``DAMAGED - <rows>x<columns> - <problem>``, cut to
    what the database column holds."""
    key = f"{DAMAGED} - {rows}x{columns} - {problem}"
    return SliceInfo(key[:STACK_KEY_CHARS], None, acquisition, number)


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def slice_info(ds: Any) -> SliceInfo:
    """The stack fields of one header (a pydicom Dataset, or any mapping-like object with
    the DICOM keywords as attributes).

    Neither ImageOrientationPatient nor ImagePositionPatient, or no Rows or Columns: a
    NON-IMAGE (a dose screen, a report). One of the two without the other (they are
    Type 1 together in the Image Plane Module, PS3.3 C.7.6.2), or present but unusable
    (``geometry_problem``): DAMAGED, with the problem in its key
    (``DAMAGED - <rows>x<columns> - <problem>``).
    """
    iop_value = getattr(ds, "ImageOrientationPatient", None)
    ipp_value = getattr(ds, "ImagePositionPatient", None)
    rows, columns = _int(getattr(ds, "Rows", None)), _int(getattr(ds, "Columns", None))
    acquisition = _int(getattr(ds, "AcquisitionNumber", None))
    number = _int(getattr(ds, "InstanceNumber", None))
    if (_absent(iop_value) and _absent(ipp_value)) or not rows or not columns:
        sop_class = str(getattr(ds, "SOPClassUID", "") or "")
        return SliceInfo(f"{NON_IMAGE} {sop_class}".strip(), None, acquisition, number)
    if _absent(iop_value) or _absent(ipp_value):  # half an Image Plane Module
        missing = "ImageOrientationPatient" if _absent(iop_value) else "ImagePositionPatient"
        return _damaged(rows, columns, f"{missing} is missing", acquisition, number)
    iop, ipp = _floats(iop_value, 6), _floats(ipp_value, 3)
    spacing = _floats(getattr(ds, "PixelSpacing", None), 2)
    problem = geometry_problem(iop, ipp, spacing)
    if problem is not None:
        return _damaged(rows, columns, problem, acquisition, number)
    assert iop is not None and ipp is not None and spacing is not None
    n0, n1, n2 = _normal(iop)
    position = n0 * ipp[0] + n1 * ipp[1] + n2 * ipp[2]
    kind = image_kind(getattr(ds, "ImageType", None))
    iop_text = ",".join(f"{v:.3f}".replace("-0.000", "0.000") for v in iop)
    key = (
        f"{kind} {orientation_name(iop)} {rows}x{columns} "
        f"{_mm(spacing[0])}x{_mm(spacing[1])}mm iop={iop_text}"
    )
    return SliceInfo(key, position, acquisition, number)


@dataclass
class Stack:
    """Instances (indices into the caller's list, sorted along the normal) of one stack."""

    key: str
    members: list[int]
    positions_mm: list[float | None] = field(default_factory=list)
    acquisition: int | None = None

    @property
    def kind(self) -> str:
        return self.key.split(" ", 1)[0]

    @property
    def orientation(self) -> str:
        parts = self.key.split(" ")
        return parts[1] if len(parts) > 1 and self.kind not in (NON_IMAGE, DAMAGED) else "-"

    @property
    def matrix(self) -> str:
        parts = self.key.split(" ")
        return parts[2] if len(parts) > 2 and self.kind != NON_IMAGE else "-"

    @property
    def damage(self) -> str:
        """What is wrong with a DAMAGED stack's geometry ("" for any other stack)."""
        return self.key.split(" - ", 2)[2] if self.kind == DAMAGED else ""

    @property
    def pixel_spacing(self) -> str:
        parts = self.key.split(" ")
        return parts[3] if len(parts) > 3 and self.kind not in (NON_IMAGE, DAMAGED) else "-"

    @property
    def slice_spacing_mm(self) -> float | None:
        known = sorted(p for p in self.positions_mm if p is not None)
        if len(known) < 2:
            return None
        return float(np.median(np.diff(known)))

    def describe(self) -> str:
        """E.g. ``LOCALIZER coronal 512x512, 1 image``."""
        count = f"{len(self.members)} image{'s' if len(self.members) != 1 else ''}"
        if self.kind == NON_IMAGE:
            return f"{count} without image geometry ({self.key.removeprefix(NON_IMAGE).strip()})"
        if self.kind == DAMAGED:
            return f"{count} {self.matrix} with a damaged header"
        acquisition = f" acquisition {self.acquisition}" if self.acquisition is not None else ""
        return f"{self.kind} {self.orientation} {self.matrix}{acquisition}, {count}"

    def has_repeated_positions(self) -> bool:
        known = sorted(p for p in self.positions_mm if p is not None)
        return any(b - a < POSITION_TOLERANCE_MM for a, b in zip(known, known[1:], strict=False))


def _sorted_stack(key: str, members: list[int], infos: Sequence[SliceInfo], acq=None) -> Stack:
    ordered = sorted(
        members,
        key=lambda i: (infos[i].position_mm is None, infos[i].position_mm or 0.0, i),
    )
    return Stack(key, ordered, [infos[i].position_mm for i in ordered], acq)


def _key_orientation(key: str) -> tuple[str, tuple[float, ...]] | None:
    """(the key without its orientation, the orientation's 6 rounded values), or None for
    a key without one (non-images, damaged images)."""
    head, sep, values = key.partition(" iop=")
    if not sep:
        return None
    try:
        return head, tuple(float(v) for v in values.split(","))
    except ValueError:
        return None


def merged_keys(keys: Iterable[str]) -> dict[str, str]:
    """Each stack key -> the key of the stack it joins: keys equal but for orientation
    values one rounding step apart (``IOP_KEY_TOLERANCE``) are one stack, so a cosine
    written 0.0004999 on some slices and 0.0005001 on others (0.000 / 0.001 in the key)
    does not split a stack. Keys are visited in sorted order and each joins the first
    earlier key within the tolerance (never a chain of them), whatever the arrival
    order."""
    joined: dict[str, str] = {}
    firsts: list[tuple[str, str, tuple[float, ...]]] = []
    for key in sorted(set(keys)):
        parsed = _key_orientation(key)
        joined[key] = key
        if parsed is None:
            continue
        head, iop = parsed
        for first, first_head, first_iop in firsts:
            if first_head == head and all(
                abs(a - b) <= IOP_KEY_TOLERANCE for a, b in zip(iop, first_iop, strict=True)
            ):
                joined[key] = first
                break
        else:
            firsts.append((key, head, iop))
    return joined


def group_stacks(infos: Sequence[SliceInfo]) -> list[Stack]:
    """Group instances into stacks (see the module docstring); order: by key."""
    by_key: dict[str, list[int]] = defaultdict(list)
    keys = [info.stack_key or NON_IMAGE for info in infos]
    joined = merged_keys(keys)
    for index, key in enumerate(keys):
        by_key[joined[key]].append(index)
    stacks: list[Stack] = []
    for key in sorted(by_key):
        stack = _sorted_stack(key, by_key[key], infos)
        if stack.kind != NON_IMAGE and stack.has_repeated_positions():
            by_acquisition: dict[int | None, list[int]] = defaultdict(list)
            for i in stack.members:
                by_acquisition[infos[i].acquisition].append(i)
            parts = [
                _sorted_stack(key, members, infos, acq)
                for acq, members in sorted(
                    by_acquisition.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)
                )
            ]
            if len(parts) > 1 and not any(p.has_repeated_positions() for p in parts):
                stacks += parts
                continue
        stacks.append(stack)
    return stacks


def _rank(stack: Stack) -> tuple[Any, ...]:
    spacing = stack.slice_spacing_mm
    return (
        KIND_RANK.get(stack.kind, 3),
        _ORIENTATION_RANK.get(stack.orientation, 3),
        -len(stack.members),
        spacing if spacing is not None else float("inf"),
        stack.key,
        stack.acquisition if stack.acquisition is not None else -1,
    )


def _why_left_out(stack: Stack, main: Stack) -> str:
    if stack.kind == NON_IMAGE:
        return "not an image of a stack (no ImageOrientationPatient / ImagePositionPatient)"
    if stack.kind == DAMAGED:
        return stack.damage
    if stack.kind == "LOCALIZER":
        return "a localizer (ImageType LOCALIZER)"
    if stack.kind != main.kind:
        return f"{stack.kind} images (reformat or secondary); the main stack is {main.kind}"
    if stack.orientation != main.orientation:
        return f"{stack.orientation}; the main stack is {main.orientation}"
    if stack.key == main.key and stack.acquisition != main.acquisition:
        amount = "as many" if len(stack.members) == len(main.members) else "more"
        return (
            f"acquisition {stack.acquisition} repeats positions of acquisition "
            f"{main.acquisition}, which has {amount} images"
        )
    if stack.matrix != main.matrix:
        return f"another matrix ({stack.matrix}); the main stack is {main.matrix}"
    if stack.pixel_spacing != main.pixel_spacing:
        return (
            f"another pixel spacing ({stack.pixel_spacing}); "
            f"the main stack has {main.pixel_spacing}"
        )
    if len(stack.members) < len(main.members):
        return "fewer images than the main stack"
    return "another orientation or geometry than the main stack"


@dataclass
class StackChoice:
    """The main stack of a series (None: no stack can be segmented) and what was left out."""

    main: Stack | None
    left_out: list[tuple[Stack, str]]
    stacks: list[Stack]

    def left_out_text(self) -> list[str]:
        """One line per left-out stack: what it is and why it was left out."""
        return [f"{stack.describe()}: {why}" for stack, why in self.left_out]


def choose_main(stacks: Sequence[Stack]) -> StackChoice:
    """The stack to classify and segment, by the rules in the module docstring."""
    candidates = [s for s in stacks if s.kind not in ("LOCALIZER", NON_IMAGE, DAMAGED)]
    main = min(candidates, key=_rank) if candidates else None
    left_out = [
        (s, _why_left_out(s, main) if main else _why_left_out(s, s))
        for s in stacks
        if s is not main
    ]
    return StackChoice(main, left_out, list(stacks))


def choose(infos: Sequence[SliceInfo]) -> StackChoice:
    """``choose_main(group_stacks(infos))``."""
    return choose_main(group_stacks(infos))


def completeness_problems(
    stack: Stack,
    instance_numbers: Sequence[int | None],
    images_in_acquisition: int | None = None,
) -> list[str]:
    """Signs in the headers that a series is not whole yet (more instances may come).

    ``stack``: the main stack; ``instance_numbers``: InstanceNumber of every instance of
    the series (None when absent). Signs: an interior gap in the stack's slice positions
    (a step over 1.5 times the usual spacing), InstanceNumbers with holes (checked only
    when every instance has a distinct number), fewer images in the stack than
    ImagesInAcquisition says. [] when nothing suggests missing slices, which proves
    nothing: a series cut short at its end looks whole in its headers.
    """
    problems = []
    known = [p for p in stack.positions_mm if p is not None]
    if len(known) >= 3:
        steps = np.diff(known)
        usual = float(np.median(steps))
        if usual > POSITION_TOLERANCE_MM:
            wide = [(a, s) for a, s in zip(known, steps, strict=False) if s > 1.5 * usual]
            if wide:
                at, step = wide[0]
                problems.append(
                    f"slice positions jump {step:.1f} mm after {at:.1f} mm "
                    f"(usual spacing {usual:.2f} mm): slices missing"
                )
    numbers = [n for n in instance_numbers if n is not None]
    if numbers and len(numbers) == len(instance_numbers) and len(set(numbers)) == len(numbers):
        low, high = min(numbers), max(numbers)
        missing = high - low + 1 - len(numbers)
        if missing > 0:
            problems.append(f"InstanceNumbers {low}..{high} with {missing} missing")
    if images_in_acquisition and len(stack.members) < images_in_acquisition:
        problems.append(
            f"{len(stack.members)} of {images_in_acquisition} images (ImagesInAcquisition)"
        )
    return problems
