"""What routing sees of a series: the attributes of its main image stack.

A series may hold localizers, reformats or several acquisitions besides its main stack
(``inference.stacks``). Rules and the phase classifier must judge the stack that will be
segmented, whatever arrived first, so the attributes of a series are the header of the
main stack's middle slice plus values derived from the whole series:

- ``InstanceCount``: images in the main stack (``SeriesInstanceCount``: in the series);
- ``Orientation`` (axial / coronal / sagittal / oblique) and ``SliceSpacing`` (mm, from the
  slice positions when known, else SpacingBetweenSlices / SliceThickness);
- ``ImageKind``: ORIGINAL, DERIVED or LOCALIZER (the main stack's kind; DAMAGED when the
  only images that could form a stack have damaged geometry headers);
- ``LeftOut``: one line per stack that is not the main one (what, and why);
- ``Incomplete``: signs in the headers that slices are missing (then the series' pipelines
  wait for the study to settle).

The live node builds them from the stack fields the receive path stored per instance
(``from_rows``), ``route explain`` from the files (``from_files``): the same code decides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from dicom_node.instance import header_attributes
from dicom_node.planning import derived_attributes
from inference.stacks import (
    DAMAGED,
    SliceInfo,
    StackChoice,
    choose,
    completeness_problems,
    slice_info,
)


@dataclass(frozen=True)
class InstanceRow:
    """One instance as routing knows it: its file and its stored stack fields."""

    path: str
    stack_key: str | None
    slice_position_mm: float | None
    acquisition_number: int | None
    instance_number: int | None


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _attributes(paths: Sequence[str], infos: Sequence[SliceInfo]) -> dict[str, Any]:
    choice = choose(infos)
    main = choice.main
    if main is None:  # only localizers or non-images: judged on the first instance
        representative = min(range(len(paths)), key=lambda i: (paths[i],))
        members: list[int] = list(range(len(paths)))
    else:
        members = main.members
        representative = members[len(members) // 2]
    attrs = header_attributes(paths[representative])
    attrs.update(derived_attributes(attrs))
    numbers = [info.instance_number for info in infos]
    attrs["InstanceCount"] = len(members)
    attrs["SeriesInstanceCount"] = len(paths)
    attrs["ImageKind"] = main.kind if main is not None else _kind_without_main(choice)
    attrs["LeftOut"] = choice.left_out_text()
    attrs["Incomplete"] = (
        completeness_problems(main, numbers, _int(attrs.get("ImagesInAcquisition")))
        if main is not None
        else []
    )
    if main is not None and main.slice_spacing_mm:
        attrs["SliceSpacing"] = round(main.slice_spacing_mm, 3)
    return attrs


def _kind_without_main(choice: StackChoice) -> str:
    """DAMAGED when images with a damaged geometry header could have been the series'
    stack, else LOCALIZER (localizers and non-images only)."""
    return DAMAGED if any(s.kind == DAMAGED for s in choice.stacks) else "LOCALIZER"


def from_rows(rows: Sequence[InstanceRow]) -> dict[str, Any]:
    """Attributes of a received series from its instance rows (files read only for rows
    recorded before the stack fields existed, and for the representative header)."""
    infos = []
    for row in rows:
        if row.stack_key is None:
            infos.append(slice_info(pydicom.dcmread(row.path, stop_before_pixels=True)))
        else:
            infos.append(
                SliceInfo(
                    row.stack_key,
                    row.slice_position_mm,
                    row.acquisition_number,
                    row.instance_number,
                )
            )
    return _attributes([row.path for row in rows], infos)


def from_files(paths: Sequence[str | Path]) -> dict[str, Any]:
    """Attributes of a series from its files (``route explain``)."""
    names = [str(p) for p in paths]
    infos = [slice_info(pydicom.dcmread(p, stop_before_pixels=True)) for p in names]
    return _attributes(names, infos)
