"""Cropping a volume to a region of interest and pasting a result back.

A fine model then runs on the kidneys' box instead of the whole abdomen: less memory,
less time. Boxes are in voxels of the reference volume; margins are given in mm.
"""

from __future__ import annotations

import numpy as np

from inference.volume import Volume

Box = tuple[slice, slice, slice]


def label_box(
    label_map: np.ndarray,
    values: list[int],
    spacing_zyx: tuple[float, float, float],
    margin_mm: float,
) -> Box | None:
    """Bounding box of ``values`` in ``label_map`` grown by ``margin_mm``; None if absent."""
    mask = np.isin(label_map, values)
    if not mask.any():
        return None
    box = []
    for axis in range(3):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        pad = int(np.ceil(margin_mm / spacing_zyx[axis]))
        box.append(
            slice(max(0, int(hits[0]) - pad), min(mask.shape[axis], int(hits[-1]) + pad + 1))
        )
    return tuple(box)  # type: ignore[return-value]


def crop_volume(volume: Volume, box: Box) -> Volume:
    """The sub-volume in ``box`` with its own origin (same spacing and direction)."""
    start = np.array([s.start for s in reversed(box)], float)  # x, y, z index
    direction = np.array(volume.direction, float).reshape(3, 3)
    spacing_xyz = np.array(tuple(reversed(volume.spacing_zyx)), float)
    origin = np.array(volume.origin_lps, float) + direction @ (start * spacing_xyz)
    return Volume(
        array=np.ascontiguousarray(volume.array[box]),
        spacing_zyx=volume.spacing_zyx,
        origin_lps=tuple(float(v) for v in origin),  # type: ignore[arg-type]
        direction=volume.direction,
        series_uid=volume.series_uid,
    )


def paste(labels: np.ndarray, box: Box, shape: tuple[int, int, int]) -> np.ndarray:
    """``labels`` (predicted on the crop) placed into an empty full-size label map."""
    out = np.zeros(shape, dtype=labels.dtype)
    out[box] = labels
    return out
