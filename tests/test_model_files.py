"""Model files are code (issue 16): pinned checkpoints, and none of them runs anything.

A checkpoint is a pickle. The node checks each one against its sha256 pin in models.yaml
and reads it without torch, refusing any global a weights file does not need; the worker
loads the bytes it has just hashed with ``torch.load(weights_only=True)``. Each test
plants a real payload (a ``__reduce__`` that writes a marker file) or changes a real
checkpoint, and checks the refusal names the model and the file and the payload never
ran; the control at the end shows the same file does run its payload under
``weights_only=False``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from inference import checkpoints
from inference.checkpoints import CheckpointError, load_checkpoint, read_checkpoint
from inference.nnunet_runner import NnUNetRunner
from inference.registry import RegistryError, load_registry
from kernel.settings import REPO_ROOT

CPU = torch.device("cpu")
CHECKPOINT = "fold_0/checkpoint_final.pth"


class Planted:
    """Pickles as a call of ``exec``: what a tampered checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('payload ran')",))


def tumor_copy(tmp_path: Path, **entry: object) -> tuple[Path, Path]:
    """The shipped tumour model copied to tmp_path with a models.yaml naming it (its
    shipped sha256 pin included unless ``entry`` overrides it); (folder, models.yaml)."""
    folder = tmp_path / "tumor"
    shutil.copytree(REPO_ROOT / "models" / "tumor", folder)
    body = yaml.safe_load((REPO_ROOT / "models.yaml").read_text())["models"]["tumor"]
    body = {**body, "folder": str(folder), **entry}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": {"tumor": body}}))
    return folder, path


def repin(path: Path, folder: Path) -> None:
    """Pin the checkpoint as it is now (the operator accepted it)."""
    raw = yaml.safe_load(path.read_text())
    digest = hashlib.sha256((folder / CHECKPOINT).read_bytes()).hexdigest()
    raw["models"]["tumor"]["sha256"] = {CHECKPOINT: digest}
    path.write_text(yaml.safe_dump(raw))


def plant(folder: Path, marker: Path) -> Path:
    """The real checkpoint with a payload added next to the weights."""
    ckpt = folder / CHECKPOINT
    data = torch.load(ckpt, map_location="cpu", weights_only=True)
    torch.save({**data, "extra": Planted(marker)}, ckpt)
    return ckpt


def test_shipped_checkpoints_are_pinned_and_read_without_torch() -> None:
    registry = load_registry()
    for spec in registry.models.values():
        (path,) = spec.checkpoint_files()
        assert spec.pinned_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
        info = read_checkpoint(path)
        assert info.segmentation_classes() == len(spec.labels) + 1, spec.id


def test_changed_checkpoint_stops_the_start_naming_model_and_file(tmp_path, start_node):
    folder, path = tumor_copy(tmp_path)
    ckpt = folder / CHECKPOINT
    ckpt.write_bytes(ckpt.read_bytes() + b"\0")
    with pytest.raises(RegistryError) as error:
        start_node(models_file=path, worker={"enabled": False})
    message = str(error.value)
    assert "model 'tumor'" in message and str(ckpt) in message and "has changed" in message
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() in message


def test_unpinned_or_wrongly_pinned_checkpoint_is_refused(tmp_path: Path) -> None:
    folder, path = tumor_copy(tmp_path, sha256={})
    digest = hashlib.sha256((folder / CHECKPOINT).read_bytes()).hexdigest()
    with pytest.raises(
        RegistryError, match=rf"model 'tumor': checkpoint .* is not pinned.*{digest}"
    ):
        load_registry(path)
    _, path = tumor_copy(tmp_path / "other", sha256={"fold_1/checkpoint_final.pth": digest})
    with pytest.raises(RegistryError, match=r"pins \['fold_1/checkpoint_final.pth'\], which are"):
        load_registry(path)
    with pytest.raises(RegistryError, match="64 hexadecimal digits"):
        load_registry(tumor_copy(tmp_path / "bad", sha256={CHECKPOINT: "abc"})[1])


def test_planted_payload_is_refused_by_the_node_without_running(tmp_path: Path) -> None:
    """Pinned (the operator accepted the file) and still refused: the node's reader knows
    no ``exec``. The pin and the content check are two defences, not one."""
    folder, path = tumor_copy(tmp_path)
    marker = tmp_path / "marker"
    ckpt = plant(folder, marker)
    repin(path, folder)
    with pytest.raises(RegistryError) as error:
        load_registry(path)
    assert str(ckpt) in str(error.value) and "builtins.exec" in str(error.value)
    assert not marker.exists()


def test_planted_payload_is_refused_by_the_worker_without_running(tmp_path, monkeypatch):
    folder, path = tumor_copy(tmp_path)
    marker = tmp_path / "marker"
    spec = load_registry(path).get("tumor")
    ckpt = plant(folder, marker)
    spec = spec.model_copy(update={"pins": {str(ckpt.resolve()): _sha(ckpt)}})
    with pytest.raises(CheckpointError) as error:
        NnUNetRunner(spec, CPU)
    assert "model 'tumor'" in str(error.value) and str(ckpt) in str(error.value)
    assert not marker.exists()
    # The second defence alone: without the scan, torch's weights_only loader refuses.
    monkeypatch.setattr(checkpoints, "scan_checkpoint", lambda data, path: None)
    with pytest.raises(CheckpointError, match=r"refused by torch") as error:
        load_checkpoint(ckpt, _sha(ckpt), "model 'tumor'")
    assert str(ckpt) in str(error.value)
    assert not marker.exists()
    # Control: the file is a real payload; weights_only=False runs it.
    torch.load(ckpt, map_location="cpu", weights_only=False)
    assert marker.read_text() == "payload ran"


def test_checkpoint_changed_after_the_start_is_refused_by_the_worker(tmp_path: Path) -> None:
    folder, path = tumor_copy(tmp_path)
    spec = load_registry(path).get("tumor")  # the node's check passed
    ckpt = folder / CHECKPOINT
    ckpt.write_bytes(ckpt.read_bytes() + b"\0")
    with pytest.raises(CheckpointError, match=r"model 'tumor': checkpoint .* has changed"):
        NnUNetRunner(spec, CPU)


def test_nnunet_training_checkpoint_loads_with_weights_only(tmp_path: Path) -> None:
    """What nnU-Net's trainer saves besides the weights (NumPy float64 logs and best EMA,
    optimizer and grad-scaler state, torch.device in init_args) loads with
    weights_only=True, and the network gets exactly the checkpoint's weights."""
    folder, path = tumor_copy(tmp_path)
    ckpt = folder / CHECKPOINT
    data = torch.load(ckpt, map_location="cpu", weights_only=True)
    weights = data["network_weights"]
    momentum = {i: {"momentum_buffer": torch.zeros_like(v)} for i, v in enumerate(weights.values())}
    data.update(
        optimizer_state={
            "state": momentum,
            "param_groups": [{"lr": np.float64(0.01), "momentum": 0.99, "params": list(momentum)}],
        },
        grad_scaler_state={"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0},
        logging={
            "mean_fg_dice": [np.float64(0.5), np.float64(0.9)],
            "ema_fg_dice": [np.float64(0.6)],
            "dice_per_class_or_region": [np.array([0.8, 0.7])],
            "train_losses": [np.float32(-0.7)],
            "epoch_start_timestamps": [1.7e9],
        },
        _best_ema=np.float64(0.93),
        init_args={**data["init_args"], "device": torch.device("cuda", 0)},
    )
    torch.save(data, ckpt)
    repin(path, folder)
    spec = load_registry(path).get("tumor")
    assert read_checkpoint(ckpt).segmentation_classes() == 3
    runner = NnUNetRunner(spec, CPU)
    loaded = runner.predictor.network.state_dict()
    for name, tensor in weights.items():
        assert torch.equal(loaded[name], tensor), name
    assert runner.predictor.trainer_name == "nnUNetTrainer"


def test_plans_naming_a_foreign_class_are_refused(tmp_path: Path) -> None:
    folder, path = tumor_copy(tmp_path)
    plans = json.loads((folder / "plans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    arch["arch_kwargs"]["nonlin"] = "subprocess.Popen"
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(RegistryError, match=r"model 'tumor': .*plans.json .* 'subprocess.Popen'"):
        load_registry(path)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
