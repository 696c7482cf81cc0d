"""The shipped stand-in nnU-Net models load in nnU-Net's predictor and segment the phantom.

Each model is scored on a seed no model was trained on (training seeds are >= 1000),
through ``nnUNetPredictor.predict_single_npy_array``, so nnU-Net's own preprocessing,
resampling to the model spacing and back are part of what is tested.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from devkit.phantom import Phantom
from devkit.standins import SPECS, TRAIN_SEED_BASE, dice_per_label
from devkit.synth import phantom_volumes, series_geometry
from inference.registry import load_registry

SHIPPED = sorted(load_registry(check_folders=False).models)  # the models in models.yaml

# Every label of every shipped stand-in must reach its spec's ``required_dice`` (0.9; the
# coarse 6 mm organ model 0.75) on a held-out phantom.

MODELS = Path(__file__).resolve().parent.parent / "models"
HELD_OUT_SEED = 11
# 192 x 192 at 2 mm covers the same 384 mm field of view as a scanner's 512 x 512 series;
# the 512 x 512 / 0.78 mm scores are in models/<name>/standin.json.
GRID = {"rows": 192, "columns": 192, "pixel_spacing_mm": 2.0, "slice_thickness_mm": 2.5}


@pytest.fixture(scope="module", autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)


@pytest.mark.parametrize("name", SHIPPED)
def test_model_folder_has_the_nnunet_layout(name: str) -> None:
    folder = MODELS / name
    dataset = json.loads((folder / "dataset.json").read_text())
    plans = json.loads((folder / "plans.json").read_text())
    checkpoint_path = folder / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == "nnUNetTrainer"
    assert checkpoint["init_args"]["configuration"] in plans["configurations"]
    assert "inference_allowed_mirroring_axes" in checkpoint
    assert dataset["labels"] == SPECS[name].label_ids
    assert len(dataset["channel_names"]) == len(SPECS[name].channel_phases)
    assert checkpoint_path.stat().st_size < 1_000_000


@pytest.mark.parametrize("name", SHIPPED)
def test_model_segments_a_held_out_phantom(name: str) -> None:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    assert HELD_OUT_SEED < TRAIN_SEED_BASE
    spec = SPECS[name]
    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_mirroring=True,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(
        str(MODELS / name), use_folds=(0,), checkpoint_name="checkpoint_final.pth"
    )
    geometry = series_geometry(Phantom(HELD_OUT_SEED), **GRID)
    phases = spec.evaluation_phases()
    volumes, truth = phantom_volumes(HELD_OUT_SEED, phases, geometry)
    image = np.stack([volumes[p] for p in phases]).astype(np.float32)

    prediction = predictor.predict_single_npy_array(
        image, {"spacing": list(geometry.spacing_zyx)}, None, None, False
    )

    assert prediction.shape == truth.shape
    dice = dice_per_label(prediction, spec.truth_lut()[truth], spec.label_ids)
    assert set(dice) == set(spec.labels)
    low = {
        label: round(value, 3)
        for label, value in dice.items()
        if value < spec.required_dice
    }
    assert not low, f"{name}: Dice below the bar for {low} (all: {dice})"
