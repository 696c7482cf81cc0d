"""Helpers for the engine tests: the stand-in models, small phantom volumes, Dice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from devkit.phantom import STRUCTURES, Phantom
from devkit.synth import SeriesGeometry, phantom_volumes, series_geometry
from inference.volume import Volume
from kernel.settings import REPO_ROOT

SEED = 7  # held out from the stand-ins' training seeds
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def model_folder(name: str) -> Path | None:
    """The shipped stand-in (models/<name>), or None."""
    folder = REPO_ROOT / "models" / name
    return folder if (folder / "fold_0" / "checkpoint_final.pth").is_file() else None


def require_model(name: str) -> Path:
    folder = model_folder(name)
    if folder is None:
        pytest.fail(f"stand-in model {name!r} is missing (python -m devkit.standins)")
    return folder


def registry_file(tmp_path: Path, names: list[str], **overrides: dict) -> Path:
    """models.yaml with the shipped entries of ``names`` pointing at their folders."""
    shipped = yaml.safe_load((REPO_ROOT / "models.yaml").read_text())["models"]
    models = {}
    for name in names:
        models[name] = {**shipped[name], "folder": str(require_model(name))}
        models[name].update(overrides.get(name, {}))
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": models}))
    return path


def grid(**kw: float) -> SeriesGeometry:
    """A small, coarse grid (fast on a CPU) over the phantom's kidneys and ureters."""
    params = {"rows": 120, "columns": 120, "pixel_spacing_mm": 3.2, "slice_thickness_mm": 3.0}
    params.update(kw)
    return series_geometry(Phantom(SEED), **params)  # type: ignore[arg-type]


def phantom_volume(phase: str, geometry: SeriesGeometry) -> tuple[Volume, np.ndarray]:
    """One phase as a Volume plus the phantom truth (STRUCTURES ids) on the same grid."""
    volumes, truth = phantom_volumes(SEED, phase, geometry)
    volume = Volume(
        volumes[phase].astype(np.float32),
        geometry.spacing_zyx,
        geometry.origin_lps,
        IDENTITY,
        series_uid=f"phantom-{SEED}-{phase}-{geometry.rows}",
    )
    return volume, truth


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def truth_of(truth: np.ndarray, *names: str) -> np.ndarray:
    return np.isin(truth, [STRUCTURES[n] for n in names])
