"""TotalSegmentator, for real, from an installed weights folder.

The folder is laid out as TotalSegmentator expects for ``total --fast`` (Dataset297, its
trainer folder name, all 117 classes as outputs) and for ``total`` at full resolution (five
part models, Dataset291-295, each with its part's classes); each holds the phantom-trained
``totalseg_ras`` stand-in, trained like TotalSegmentator's models on closest-canonical (RAS)
arrays (``devkit.standins.make_totalsegmentator_weights``). Our registry resolves it with
TotalSegmentator's own task tables and runs it warm, reoriented as TotalSegmentator does;
TotalSegmentator's own command line runs on the same folder, offline; both find the
phantom's organs (a model fed the wrong voxel order would swap left and right).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml

from devkit.standins import make_totalsegmentator_weights
from inference.engine import Engine
from inference.nifti_io import write_volume
from inference.registry import RegistryError, load_registry
from tests.test_engine_support import dice, grid, phantom_volume, require_model, truth_of

pytestmark = pytest.mark.slow

ANATOMY = ["SCT", "91723000", "Anatomical Structure"]
# TotalSegmentator class id -> (name, SNOMED type, phantom structures)
ORGANS = {
    1: ("spleen", ["SCT", "78961009", "Spleen"], ("spleen",)),
    2: ("kidney_right", ["SCT", "64033007", "Kidney"], ("kidney_right",)),
    3: ("kidney_left", ["SCT", "64033007", "Kidney"], ("kidney_left",)),
    5: ("liver", ["SCT", "10200004", "Liver"], ("liver",)),
    52: ("aorta", ["SCT", "15825003", "Aorta"], ("aorta",)),
    63: ("inferior_vena_cava", ["SCT", "64131007", "Inferior vena cava"], ("inferior_vena_cava",)),
}


@pytest.fixture(scope="module")
def totalseg_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("totalseg")
    source = require_model("totalseg_ras")
    make_totalsegmentator_weights(source, home / "weights")  # total --fast
    parts = make_totalsegmentator_weights(source, home / "weights", fast=False)  # 5 parts
    assert len(parts) == 5
    return home


@pytest.fixture
def totalseg_env(totalseg_home: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {
        "TOTALSEG_WEIGHTS_PATH": str(totalseg_home / "weights"),
        "TOTALSEG_HOME_DIR": str(totalseg_home / "home"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


# The full-resolution ensemble runs at 1.5 mm, so its cost grows with the field of view,
# not the grid: there the field of view is the body's (272 mm front to back instead of
# 384 mm of air around it) and 72 slices (180 mm) over the kidneys instead of 86. Its
# five models still see the whole body width and each organ. The 3 mm fast model keeps
# the whole 384 x 384 x 215 mm (cropped like the full one, its IVC Dice drops to ~0.9).
PORTAL_GRID = {
    True: {"rows": 192, "columns": 192, "pixel_spacing_mm": 2.0, "slice_thickness_mm": 2.5},
    False: {"rows": 136, "columns": 192, "pixel_spacing_mm": 2.0, "slice_thickness_mm": 2.5,
            "slices": 72},
}  # fmt: skip


@pytest.fixture(scope="module")
def portals() -> dict[bool, tuple]:
    return {fast: phantom_volume("P", grid(**kw)) for fast, kw in PORTAL_GRID.items()}


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "full-resolution-ensemble"])
def test_registry_runs_the_task_from_the_installed_weights(
    totalseg_env: dict[str, str], portals: dict[bool, tuple], tmp_path: Path, fast: bool
) -> None:
    """fast: one 3 mm model. Full resolution: TotalSegmentator's five part models, merged
    into the task's class ids by name (the stand-in's organs sit in two parts: spleen,
    kidneys and liver in "organs", aorta and IVC in "cardiac")."""
    entry = {
        "kind": "totalsegmentator",
        "task": "total",
        "fast": fast,
        "version": "stand-in",
        "use_mirroring": False,
        "channels": ["image"],
        "labels": {
            v: {"name": n, "category": ANATOMY, "type": t} for v, (n, t, _) in ORGANS.items()
        },
    }
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": {"organs": entry}}))
    engine = Engine(load_registry(path), torch.device("cpu"))
    assert len(engine.registry.get("organs").parts) == (0 if fast else 5)
    volume, truth = portals[fast]
    labels = engine.predict("organs", {"image": volume})
    assert labels.shape == truth.shape
    assert set(np.unique(labels)) <= {0, *ORGANS}
    for value, (name, _, structures) in ORGANS.items():
        assert dice(labels == value, truth_of(truth, *structures)) >= 0.9, name
    # Usage statistics are off before anything of TotalSegmentator runs.
    config = json.loads((Path(totalseg_env["TOTALSEG_HOME_DIR"]) / "config.json").read_text())
    assert config["send_usage_stats"] is False


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "full-resolution-ensemble"])
def test_totalsegmentator_command_line_runs_offline_on_the_same_weights(
    totalseg_env: dict[str, str], portals: dict[bool, tuple], tmp_path: Path, fast: bool
) -> None:
    volume, truth = portals[fast]
    image = write_volume(volume, tmp_path / "ct.nii.gz")
    out = tmp_path / "seg.nii.gz"
    home = Path(totalseg_env["TOTALSEG_HOME_DIR"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.json").write_text(
        json.dumps({"totalseg_id": "test", "send_usage_stats": False, "prediction_counter": 0})
    )
    exe = Path(sys.executable).parent / "TotalSegmentator"
    env = {**os.environ, **totalseg_env, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [str(exe), "-i", str(image), "-o", str(out), "--task", "total", "--ml",
         *(["--fast"] if fast else []),
         "--device", "cpu", "--nr_thr_resamp", "1", "--nr_thr_saving", "1"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert theirs.shape == truth.shape
    for value, (name, _, structures) in ORGANS.items():
        assert dice(theirs == value, truth_of(truth, *structures)) >= 0.9, name


def test_a_missing_ensemble_part_is_named(
    totalseg_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = tmp_path / "weights"
    shutil.copytree(totalseg_home / "weights", weights)
    ribs = next(weights.glob("Dataset295_*"))
    shutil.rmtree(ribs)
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(weights))
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "home"))
    entry = {"kind": "totalsegmentator", "task": "total", "fast": False, "version": "1",
             "labels": {1: {"name": "spleen", "category": ANATOMY,
                            "type": ORGANS[1][1]}}}  # fmt: skip
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": {"organs_full": entry}}))
    with pytest.raises(RegistryError) as error:
        load_registry(path)
    message = str(error.value)
    assert "organs_full" in message and "task id 295" in message and ribs.name in message
    assert "nothing is downloaded" in message
