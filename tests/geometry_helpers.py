"""Patient-space checks shared by the patient position and gantry tilt tests.

Truth is sampled from the phantom at the LPS centre of every voxel, taken from the DICOM
headers (``devkit.patient_position.pixel_positions_lps``) or from a NIfTI file's own
affine (nibabel, which honours a sheared sform), never from the code under test.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from devkit.phantom import STRUCTURES, Phantom

KIDNEYS = ("kidney_left", "kidney_right")
# totalseg stand-in label value -> phantom structure (TotalSegmentator's class names)
TOTALSEG = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "liver", 5: "aorta",
            6: "inferior_vena_cava"}  # fmt: skip
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def nifti_positions_lps(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI file's voxels [z, y, x] and their LPS centres [z, y, x, 3] (mm), by nibabel."""
    image = nib.load(str(path))
    data = np.asarray(image.dataobj)
    i, j, k = np.meshgrid(*(np.arange(n) for n in data.shape), indexing="ij")
    ijk = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(np.float64)
    ras = ijk @ image.affine.T
    lps = ras[..., :3] @ _RAS_TO_LPS
    return np.transpose(data, (2, 1, 0)), np.transpose(lps, (2, 1, 0, 3))


def truth_at(seed: int, positions_lps: np.ndarray) -> np.ndarray:
    """Phantom truth (STRUCTURES ids) at LPS points [..., 3]."""
    return Phantom(seed).labels(positions_lps)


def structure(truth: np.ndarray, *names: str) -> np.ndarray:
    return np.isin(truth, [STRUCTURES[n] for n in names])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def totalseg_scores(
    label_map: np.ndarray, positions_lps: np.ndarray, seed: int
) -> dict[str, float]:
    """Dice per totalseg structure of ``label_map`` against the truth at its voxels."""
    truth = truth_at(seed, positions_lps)
    return {
        name: round(dice(label_map == value, truth == STRUCTURES[name]), 3)
        for value, name in TOTALSEG.items()
    }


def assert_sides(label_map: np.ndarray, positions_lps: np.ndarray) -> None:
    """kidney_left lies on the patient's left (LPS x > 0), kidney_right on the right."""
    left = positions_lps[label_map == 3][:, 0]
    right = positions_lps[label_map == 2][:, 0]
    assert left.size and right.size, "a kidney is missing"
    assert left.mean() > 30.0 and right.mean() < -30.0, (left.mean(), right.mean())
