"""Image evidence of the contrast phase: HU measured in the structures an organ model finds.

When a series' tags do not tell its contrast phase, the node runs a coarse organ model of
the registry on it (a worker job, ``PHASE_EVIDENCE_JOB``) and measures, on the series'
own voxels:

- ``aorta``, ``venous`` (portal vein and/or IVC) and ``kidney``: median HU inside each
  structure, away from its border (partial volume);
- ``corticomedullary_hu``: kidney cortex minus medulla (outer shell minus core), high in
  the arterial (corticomedullary) phase, near 0 once the kidney is homogeneous;
- ``excreted_ml``: millilitres of voxels at or above ``EXCRETED_MIN_HU`` inside each
  kidney's outline (the largest component of its label, holes filled slice by slice, so
  the renal sinus and pelvis count), away from the vessels: contrast in the collecting
  system (excretory phase). Only inside the outline: a margin around a coarse mask would
  reach the spine and ribs, which are as dense as excreted contrast.

The classifier (``dicom_node.phases``) turns these numbers into a phase with thresholds
from the rules file; this module only measures. The model runs at its own (coarsest)
resolution: the series is resampled to the model's spacing first, so nnU-Net does no
resampling of its own, and the masks are brought back to a measuring grid: the series'
own, or ``MEASURE_SPACING_MM`` where the series is finer (medians of HU do not need
sub-millimetre voxels, and the morphology on a 512 x 512 grid would cost seconds).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from inference.model_spacing import target_spacing_mm
from inference.volume import Volume

# SimpleITK and SciPy are imported where the measuring is done, not here: the node process
# imports this module for PHASE_EVIDENCE_JOB and runs without them (the worker measures).

# The job the router queues for a series whose tags are weak (jobs.pipeline).
PHASE_EVIDENCE_JOB = "@phase-evidence"
EXCRETED_MIN_HU = 300.0  # iodinated urine in the collecting system; unenhanced urine ~0-20
_BORDER_MM = 2.0  # measure this far inside a structure (partial volume at its edge)
_SHELL_MM = (1.5, 4.5)  # the kidney cortex: between these depths below the surface
_CORE_MM = 7.0  # the medulla and sinus: deeper than this
_MIN_VOXELS = 20
MEASURE_SPACING_MM = 2.0


class EvidenceError(ValueError):
    """No image evidence can be taken from this series (the message says why)."""


def _coarse(volume: Volume, spacing_mm: float, *, at_least: bool = False) -> Volume:
    """``volume`` resampled (linear) to ``spacing_mm`` over the same extent and direction;
    with ``at_least`` only the axes finer than ``spacing_mm`` are resampled."""
    import SimpleITK as sitk

    image = volume.to_sitk()
    old = np.array(image.GetSpacing())
    new = np.maximum(old, spacing_mm) if at_least else np.full(3, spacing_mm)
    if np.allclose(old, new):
        return volume
    size = [
        max(1, int(round(n * s / t))) for n, s, t in zip(image.GetSize(), old, new, strict=True)
    ]
    coarse = sitk.Resample(
        image,
        size,
        sitk.Transform(),
        sitk.sitkLinear,
        image.GetOrigin(),
        tuple(float(t) for t in new),
        image.GetDirection(),
        -1024.0,
        sitk.sitkFloat32,
    )
    return Volume.from_sitk(coarse, series_uid=volume.series_uid)


def _to_grid(labels: np.ndarray, coarse: Volume, volume: Volume) -> np.ndarray:
    """A coarse label map brought onto ``volume``'s grid (nearest neighbour)."""
    import SimpleITK as sitk

    image = coarse.to_sitk(labels.astype(np.uint8))
    out = sitk.Resample(
        image, volume.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8
    )
    return sitk.GetArrayFromImage(out)


def _ball(radius_mm: float, spacing_zyx: Sequence[float]) -> np.ndarray:
    r = [max(1, int(round(radius_mm / s))) for s in spacing_zyx]
    z, y, x = np.ogrid[-r[0] : r[0] + 1, -r[1] : r[1] + 1, -r[2] : r[2] + 1]
    return (z * spacing_zyx[0]) ** 2 + (y * spacing_zyx[1]) ** 2 + (x * spacing_zyx[2]) ** 2 <= (
        radius_mm**2 + 1e-6
    )


def _inside(mask: np.ndarray, depth_mm: float, spacing_zyx: Sequence[float]) -> np.ndarray:
    """Voxels of ``mask`` at least ``depth_mm`` from its surface (the mask if that is empty
    or too small)."""
    from scipy import ndimage

    eroded = ndimage.binary_erosion(mask, _ball(depth_mm, spacing_zyx))
    return eroded if eroded.sum() >= _MIN_VOXELS else mask


def _outline(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of ``mask`` with its holes filled slice by slice."""
    from scipy import ndimage

    components, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = ndimage.sum(mask, components, range(1, count + 1))
    largest = components == 1 + int(np.argmax(sizes))
    return np.stack([ndimage.binary_fill_holes(plane) for plane in largest])


def _median(array: np.ndarray, mask: np.ndarray) -> float | None:
    return round(float(np.median(array[mask])), 1) if mask.any() else None


def measure(
    engine: Any,
    model_id: str,
    volume: Volume,
    structures: Mapping[str, Sequence[str]],
) -> dict[str, Any]:
    """Run ``model_id`` on ``volume`` at the model's spacing and measure (see the module
    docstring). ``structures``: ``aorta`` / ``venous`` / ``kidney`` -> label names for
    each; names the model does not have are skipped (one list fits several models).
    Returns JSON-ready numbers (HU, ml, seconds).

    Raises ``EvidenceError`` when the model has no aorta label or finds no aorta (without
    it no phase can be read from the image).
    """
    from scipy import ndimage

    started = time.perf_counter()
    spec = engine.registry.get(model_id)
    ids = spec.label_ids()
    structures = {role: [n for n in names if n in ids] for role, names in structures.items()}
    structures = {role: names for role, names in structures.items() if names}
    if "aorta" not in structures:
        raise EvidenceError(f"model {model_id} has no aorta label")
    spacing = target_spacing_mm(spec) or 6.0
    coarse = _coarse(volume, spacing)
    labels = engine.predict(model_id, {spec.channels[0]: coarse})
    grid = _coarse(volume, MEASURE_SPACING_MM, at_least=True)
    fine = _to_grid(labels, coarse, grid)
    hu = grid.array
    sp = grid.spacing_zyx
    voxel_ml = float(np.prod(sp)) / 1000.0
    masks = {role: np.isin(fine, [ids[n] for n in names]) for role, names in structures.items()}
    organs = [fine == ids[n] for n in structures.get("kidney", [])]
    result: dict[str, Any] = {"model": model_id, "model_spacing_mm": spacing, "hu": {}, "ml": {}}
    for role, mask in masks.items():
        result["ml"][role] = round(float(mask.sum()) * voxel_ml, 1)
        result["hu"][role] = _median(hu, _inside(mask, _BORDER_MM, sp))
    if not result["ml"].get("aorta"):
        raise EvidenceError(f"model {model_id} found no aorta in series {volume.series_uid}")
    kidney = masks.get("kidney")
    if kidney is not None and kidney.any():
        shell = _inside(kidney, _SHELL_MM[0], sp) & ~_inside(kidney, _SHELL_MM[1], sp)
        core = ndimage.binary_erosion(kidney, _ball(_CORE_MM, sp))
        cortex, medulla = (
            _median(hu, shell),
            _median(hu, core) if core.sum() >= _MIN_VOXELS else None,
        )
        result["corticomedullary_hu"] = (
            round(cortex - medulla, 1) if cortex is not None and medulla is not None else None
        )
        region = np.zeros_like(kidney)
        for organ in organs:
            region |= _outline(organ)
        vessels = np.zeros_like(kidney)
        for role in ("aorta", "venous"):
            if role in masks:
                vessels |= masks[role]
        region &= ~ndimage.binary_dilation(vessels, _ball(2.0, sp))
        result["excreted_ml"] = round(float((hu[region] >= EXCRETED_MIN_HU).sum()) * voxel_ml, 2)
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result
