"""Training data for the stand-in models: phantom volumes as nnU-Net's predictor sees them.

Every case is a phantom seed on a random scanner-like grid, put through nnU-Net's own
inference preprocessing (``DefaultPreprocessor.run_case_npy``: CTNormalization with the
intensity properties of plans.json, then the resampling the plans name). The truth is
sampled from the phantom where the resampled voxels really lie, so it is exact.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from devkit.phantom import STRUCTURES, Phantom
from devkit.synth import SeriesGeometry, phantom_volumes, series_geometry

if TYPE_CHECKING:
    from devkit.standins import StandinSpec

CONFIGURATION = "3d_fullres"


def random_geometry(phantom: Phantom, rng: np.random.Generator) -> SeriesGeometry:
    """A scanner-like grid: in-plane 0.7-2 mm, slices 1.5-3 mm, FOV 340-420 mm."""
    pixel_mm = float(rng.uniform(0.7, 2.0))
    slice_mm = float(rng.uniform(1.5, 3.0))
    fov_mm = float(rng.uniform(340, 420))
    n = int(round(fov_mm / pixel_mm))
    return series_geometry(
        phantom,
        rows=n,
        columns=n,
        pixel_spacing_mm=pixel_mm,
        slice_thickness_mm=slice_mm,
        z_offset_mm=float(rng.uniform(-8, 8)),
        xy_offset_mm=(float(rng.uniform(-15, 15)), float(rng.uniform(-15, 15))),
    )


def _case_phases(spec: StandinSpec, rng: np.random.Generator) -> str:
    return "".join(str(rng.choice(list(options))) for options in spec.channel_phases)


def intensity_properties(spec: StandinSpec, seeds: Sequence[int]) -> dict[str, dict[str, float]]:
    """Intensity statistics per channel in the layout of nnU-Net's dataset fingerprint.

    CTNormalization clips to percentile_00_5 / percentile_99_5 and z-scores with mean /
    std. nnU-Net pools voxels inside the labels; we pool those plus as many voxels from
    the rest of the body. In real CT, partial volume at organ borders puts fat and soft
    tissue values into the label voxels and so into the clip window; the phantom has no
    partial volume, and with labels alone a hypodense tumour would be clipped to the same
    value as fat.
    """
    lut = spec.truth_lut()
    samples: list[list[np.ndarray]] = [[] for _ in spec.channel_phases]
    for seed in seeds:
        rng = np.random.default_rng([seed, spec.dataset_id, 1])
        phantom = Phantom(seed)
        geometry = random_geometry(phantom, rng)
        phases = _case_phases(spec, rng)
        volumes, truth = phantom_volumes(seed, phases, geometry)
        foreground = lut[truth] > 0
        body = (truth > 0) & ~foreground
        for c, phase in enumerate(phases):
            for mask in (foreground, body):
                values = volumes[phase][mask]
                samples[c].append(rng.choice(values, size=min(values.size, 10000), replace=False))
    props = {}
    for c, parts in enumerate(samples):
        v = np.concatenate(parts).astype(np.float64)
        props[str(c)] = {
            "max": float(v.max()),
            "mean": float(v.mean()),
            "median": float(np.median(v)),
            "min": float(v.min()),
            "percentile_00_5": float(np.percentile(v, 0.5)),
            "percentile_99_5": float(np.percentile(v, 99.5)),
            "std": float(v.std()),
        }
    return props


@dataclass
class TrainingCase:
    # One float32 [c, z, y, x] image per phase combination the channels may come from,
    # preprocessed like nnU-Net does at inference (a patch picks one at random).
    images: list[np.ndarray]
    seg: np.ndarray  # uint8 [z, y, x], model label ids
    locations: dict[int, np.ndarray]  # label id -> voxel indices [n, 3]
    negatives: list[np.ndarray]  # voxel indices [n, 3] per entry of spec.hard_negatives


def preprocess(
    images: np.ndarray, spacing_zyx: Sequence[float], plans: dict, dataset: dict
) -> np.ndarray:
    """nnU-Net's own inference preprocessing: transpose, crop, normalise, resample."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    configuration = plans_manager.get_configuration(CONFIGURATION)
    data, _, _ = DefaultPreprocessor(verbose=False).run_case_npy(
        images, None, {"spacing": list(spacing_zyx)}, plans_manager, configuration, dataset
    )
    return np.ascontiguousarray(data, dtype=np.float32)


def make_case(spec: StandinSpec, seed: int, plans: dict, dataset: dict) -> TrainingCase:
    rng = np.random.default_rng([seed, spec.dataset_id, 1])
    phantom = Phantom(seed)
    geometry = random_geometry(phantom, rng)
    combinations = ["".join(c) for c in itertools.product(*spec.channel_phases)]
    volumes, _ = phantom_volumes(seed, "".join(sorted(set("".join(combinations)))), geometry)
    images = [
        preprocess(
            np.stack([volumes[p] for p in phases]).astype(np.float32),
            geometry.spacing_zyx,
            plans,
            dataset,
        )
        for phases in combinations
    ]
    data = images[0]
    # Truth where the resampled voxels really are: torch interpolation (align_corners
    # False) keeps the field of view, so the effective spacing is extent / new shape.
    old_shape = np.array(geometry.shape_zyx, dtype=np.float64)
    new_shape = np.array(data.shape[1:], dtype=np.float64)
    old_spacing = np.array(geometry.spacing_zyx)
    new_spacing = old_spacing * old_shape / new_shape
    origin_zyx = np.array(geometry.origin_lps[::-1]) + 0.5 * (new_spacing - old_spacing)
    truth = phantom.labels_on_grid(
        tuple(origin_zyx[::-1]), tuple(new_spacing), tuple(int(v) for v in new_shape)
    )
    seg = spec.truth_lut()[truth]
    if spec.canonical_ras:  # the phantom grids have identity direction: mirror x and y
        images = [np.ascontiguousarray(i[:, :, ::-1, ::-1]) for i in images]
        seg = np.ascontiguousarray(seg[:, ::-1, ::-1])
        truth = np.ascontiguousarray(truth[:, ::-1, ::-1])
    locations = {label: _some_voxels(seg == label, rng) for label in range(1, len(spec.labels) + 1)}
    negatives = [_some_voxels(truth == STRUCTURES[name], rng) for name in spec.hard_negatives]
    return TrainingCase(images=images, seg=seg, locations=locations, negatives=negatives)


def _some_voxels(mask: np.ndarray, rng: np.random.Generator, limit: int = 20000) -> np.ndarray:
    """Indices [n, 3] of up to ``limit`` voxels of ``mask`` (enough to centre patches on)."""
    where = np.argwhere(mask)
    if len(where) > limit:
        where = where[rng.choice(len(where), size=limit, replace=False)]
    return where


def sample_batch(
    spec: StandinSpec, cases: list[TrainingCase], rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches, oversampling foreground with every label equally likely (thin ones too)."""
    patch = np.array(spec.train_patch)
    xs, ys = [], []
    for _ in range(spec.batch_size):
        case = cases[int(rng.integers(len(cases)))]
        shape = np.array(case.seg.shape)
        present = [loc for loc in case.locations.values() if len(loc)]
        negatives = [loc for loc in case.negatives if len(loc)]
        pick = rng.random()
        if present and pick < spec.foreground_fraction:
            loc = present[int(rng.integers(len(present)))]
        elif negatives and pick < spec.foreground_fraction + spec.hard_negative_fraction:
            loc = negatives[int(rng.integers(len(negatives)))]
        else:
            loc = None
        if loc is not None:
            centre = loc[int(rng.integers(len(loc)))] + rng.integers(-patch // 3, patch // 3 + 1)
            start = centre - patch // 2
        else:
            start = rng.integers(0, np.maximum(shape - patch, 0) + 1)
        start = np.clip(start, 0, np.maximum(shape - patch, 0))
        sl = tuple(slice(int(a), int(a) + int(p)) for a, p in zip(start, patch, strict=True))
        image = case.images[int(rng.integers(len(case.images)))]
        x, y = image[(slice(None), *sl)], case.seg[sl]
        if spec.mirror_axes:
            for axis in spec.mirror_axes:
                if rng.random() < 0.5:
                    x, y = np.flip(x, axis=axis + 1), np.flip(y, axis=axis)
        xs.append(np.ascontiguousarray(x))
        ys.append(np.ascontiguousarray(y))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys).astype(np.int64))


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + batch soft Dice over the foreground classes (nnU-Net's DC_and_CE),
    plus a small penalty on the logits' size.

    The penalty matters: nnU-Net accumulates sliding-window logits in float16 (times a
    Gaussian of peak 10), and a network without normalisation layers otherwise learns
    logits in the thousands, which overflow to inf or lose the argmax to rounding.
    """
    ce = torch.nn.functional.cross_entropy(logits, target) + 1e-4 * logits.square().mean()
    probs = torch.softmax(logits, dim=1)[:, 1:]
    onehot = torch.nn.functional.one_hot(target, logits.shape[1]).permute(0, 4, 1, 2, 3)[:, 1:]
    dims = (0, 2, 3, 4)
    intersect = (probs * onehot).sum(dims)
    denominator = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * intersect + 1e-5) / (denominator + 1e-5)
    return ce - dice.mean()
