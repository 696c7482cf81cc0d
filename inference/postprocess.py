"""Per-label clean-up of a label map: largest component, minimum volume, holes, smoothing.

Runs on the label map in the reference geometry, so volumes in ml are physical volumes.
"""

from __future__ import annotations

import numpy as np

from inference.registry import PostProcessSpec


def clean_label(
    mask: np.ndarray, spec: PostProcessSpec, spacing_zyx: tuple[float, float, float]
) -> np.ndarray:
    """The cleaned boolean mask of one label."""
    from scipy import ndimage  # here, not at the top: the node process imports the engine

    if not mask.any():
        return mask
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    if spec.smooth_mm > 0:
        sigma = [spec.smooth_mm / s for s in spacing_zyx]
        mask = ndimage.gaussian_filter(mask.astype(np.float32), sigma) >= 0.5
    if spec.fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    if spec.largest_component or spec.min_volume_ml > 0:
        components, count = ndimage.label(mask)
        if count > 0:
            sizes = np.bincount(components.ravel())[1:]
            keep = np.ones(count, bool)
            if spec.min_volume_ml > 0:
                keep &= sizes * voxel_ml >= spec.min_volume_ml
            if spec.largest_component:
                largest = np.zeros(count, bool)
                largest[int(np.argmax(sizes))] = True
                keep &= largest
            lut = np.concatenate([[False], keep])
            mask = lut[components]
    return mask


def postprocess(
    label_map: np.ndarray,
    specs: dict[int, PostProcessSpec],
    spacing_zyx: tuple[float, float, float],
) -> np.ndarray:
    """Apply each label's post-processing; only labels with a non-default spec are touched.

    Work happens inside each label's bounding box, so a small organ in a big CT is cheap.
    """
    out = label_map
    for value, spec in specs.items():
        if spec == PostProcessSpec():
            continue
        mask = label_map == value
        if not mask.any():
            continue
        box = _bbox(mask, pad=max(2, int(np.ceil(3 * spec.smooth_mm / min(spacing_zyx)))))
        sub = mask[box]
        cleaned = clean_label(sub, spec, spacing_zyx)
        if out is label_map:
            out = label_map.copy()
        region = out[box]
        region[(region == value) & ~cleaned] = 0
        region[cleaned & (region == 0)] = value
    return out


def _bbox(mask: np.ndarray, pad: int) -> tuple[slice, ...]:
    idx = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != d))) for d in range(3)]
    return tuple(
        slice(max(0, int(i[0]) - pad), min(mask.shape[d], int(i[-1]) + pad + 1))
        for d, i in enumerate(idx)
    )
