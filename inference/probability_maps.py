"""Per-label probability maps of a pipeline (``PipelineSpec.probabilities``).

A pipeline may keep, besides its label map, how sure its models were: per voxel, the
probability of each output label (nnU-Net's softmax of the logits), in the reference
series' geometry, held as float16. They are written as one 4D NIfTI (channel 0 the
background, then one channel per label in the order of the pipeline's labels) and
optionally as a FRACTIONAL DICOM-SEG (``seg_writer``, PROBABILITY, 8 bits: 255 =
certain). NIfTI-1 has no 16-bit float type, so the file stores 8 bits per value with
``scl_slope`` 1/255: every NIfTI reader returns probabilities 0..1 in steps of 0.004, the
same steps as the FRACTIONAL SEG.

Threshold: the label map the node sends is the argmax of these probabilities (background
included), before post-processing (largest component, minimum volume, ...) and before a
model's ``min_confidence``, which turns voxels whose winning probability is lower into
background. A viewer showing the FRACTIONAL SEG at 50 % shows about the label map of a
two-class model; with more classes a label can win with less than 50 %.

Memory: float16 maps cost 2 bytes per voxel and channel (a 512 x 512 x 300 series with
two labels: 450 MB), on top of the label map.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def paste_probabilities(
    probabilities: np.ndarray, box: Any, shape: tuple[int, int, int]
) -> np.ndarray:
    """Probabilities [classes, ...] of a crop placed into a full volume of ``shape``;
    outside the crop the background (channel 0) is certain."""
    full = np.zeros((probabilities.shape[0], *shape), dtype=probabilities.dtype)
    full[0] = 1
    full[(slice(None), *box)] = probabilities
    return full


def combine_probabilities(maps: Sequence[np.ndarray], models: Sequence[Any]) -> np.ndarray:
    """One map for a pipeline from its models' maps: background, then each model's label
    channels in the order their labels join the pipeline's label list.

    The background is the lowest background probability of any model (a voxel is
    background only as far as every model says so). ``models`` are the ``ModelSpec``s
    whose ``segment_labels()`` order the channels.
    """
    background = np.min(np.stack([m[0] for m in maps]), axis=0)
    channels = [background]
    for probabilities, model in zip(maps, models, strict=True):
        for label in model.segment_labels():
            channels.append(probabilities[label.value])
    return np.stack(channels).astype(np.float16, copy=False)


def write_nifti(reference: Any, probabilities: np.ndarray, path: Path) -> Path:
    """The map as a 4D NIfTI (x, y, z, channel; 8 bits scaled by 1/255) on ``reference``'s
    voxels, with the affine of its slice headers (a sheared one for a tilted stack, as
    ``nifti_io.write_mask``), written atomically."""
    import nibabel as nib

    from inference.nifti_io import affine_ras
    from inference.orientation import is_orthogonal, stack_geometry

    if probabilities.shape[1:] != reference.shape:
        raise ValueError(
            f"probabilities {probabilities.shape} do not match series "
            f"{reference.series_uid} {reference.shape}"
        )
    placed = stack_geometry(reference)
    affine = affine_ras(placed)
    scaled = np.rint(np.clip(probabilities.astype(np.float32), 0, 1) * 255).astype(np.uint8)
    data = np.ascontiguousarray(np.transpose(scaled, (3, 2, 1, 0)))
    image = nib.Nifti1Image(data, affine)
    image.header.set_data_dtype(np.uint8)
    image.header.set_slope_inter(1.0 / 255.0, 0.0)
    image.set_sform(affine, code=1)
    if not is_orthogonal(placed.direction):
        image.set_qform(None, code=0)
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = "class probabilities: channel 0 background, then labels"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part.nii.gz")
    nib.save(image, str(tmp))
    tmp.replace(path)
    return path
