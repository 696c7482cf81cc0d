"""TotalSegmentator tasks from weights the operator installed, offline and warm.

TotalSegmentator names a trained-model folder per task (``Dataset297_..._3mm`` for
``total --fast``) under ``TOTALSEG_WEIGHTS_PATH`` (or ``TOTALSEG_HOME_DIR/nnunet/results``).
We resolve that folder with TotalSegmentator's own task tables, refuse to start when it
is missing (TotalSegmentator itself would download it), and write its ``config.json``
with usage statistics off so no code path here or in TotalSegmentator touches the network.
The folder is then an ordinary nnU-Net model folder run warm by ``NnUNetRunner``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from inference.registry import ModelSpec, RegistryError

TOTALSEG_CONFIG = {
    "send_usage_stats": False,
    "statistics_disclaimer_shown": True,
}


def ensure_offline_config() -> Path:
    """Write ``$TOTALSEG_HOME_DIR/config.json`` with statistics off; returns its path.

    Keeps other keys (a license number) and keeps ``prediction_counter`` an integer,
    which TotalSegmentator increments on every run.
    """
    from totalsegmentator.config import get_totalseg_dir

    home = get_totalseg_dir()
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.json"
    config: dict = {}
    if path.exists():
        try:
            config = json.loads(path.read_text())
        except ValueError:
            config = {}
    config.update(TOTALSEG_CONFIG)
    config.setdefault("totalseg_id", "dicom-node-offline")
    if not isinstance(config.get("prediction_counter"), int):
        config["prediction_counter"] = 0
    path.write_text(json.dumps(config, indent=4))
    return path


def weights_dir() -> Path:
    from totalsegmentator.config import get_weights_dir

    return Path(get_weights_dir())


def task_folders(task: str, *, fast: bool, fastest: bool) -> list[tuple[int, Path]]:
    """(task id, nnU-Net model folder) pairs TotalSegmentator would load for the task."""
    from totalsegmentator.libs import TASK_ID_WEIGHTS_CONFIGS
    from totalsegmentator.python_api import get_task_config

    config = get_task_config(task, fast=fast, fastest=fastest, quiet=True)
    ids = config["task_id"] if isinstance(config["task_id"], list) else [config["task_id"]]
    inner = f"{config['trainer']}__{config.get('plans') or 'nnUNetPlans'}__{config['model']}"
    out = []
    for task_id in ids:
        info = TASK_ID_WEIGHTS_CONFIGS[task_id]
        folder = Path(info.get("rel_path") or "") / info["foldername"]
        out.append((task_id, weights_dir() / folder / inner))
    return out


def resolve_task_folders(spec: ModelSpec) -> list[Path]:
    """The installed model folders of a registry entry of kind ``totalsegmentator``: one,
    or one per part for the full-resolution ensemble (``fast: false``)."""
    where = f"model {spec.id!r} (TotalSegmentator task {spec.task!r})"
    try:
        folders = task_folders(str(spec.task), fast=spec.fast, fastest=spec.fastest)
    except (ValueError, KeyError) as exc:
        raise RegistryError(f"{where}: unknown task or mode: {exc}") from None
    for task_id, folder in folders:
        if not folder.is_dir():
            hint = (
                "TOTALSEG_WEIGHTS_PATH"
                if "TOTALSEG_WEIGHTS_PATH" in os.environ
                else ("TOTALSEG_HOME_DIR (or TOTALSEG_WEIGHTS_PATH)")
            )
            raise RegistryError(
                f"{where}: weights for task id {task_id} are not installed: {folder} does "
                f"not exist. Install them there (set {hint}); nothing is downloaded."
            )
    ensure_offline_config()
    paths = [folder for _, folder in folders]
    known = task_label_names(str(spec.task), paths)
    for value, label in spec.labels.items():
        if known.get(value) is None:
            raise RegistryError(f"{where}: label {value} ({label.name}) is not an output")
    unknown = [n for n in spec.roi_subset if n not in known.values()]
    if unknown:
        raise RegistryError(f"{where}: roi_subset names unknown classes {unknown}")
    return paths


def folder_labels(folder: Path) -> dict[int, str]:
    """Label id -> class name of one nnU-Net model folder (its dataset.json)."""
    dataset = json.loads((folder / "dataset.json").read_text())
    return {int(v): k for k, v in dataset["labels"].items() if int(v) != 0}


def task_label_names(task: str, folders: list[Path]) -> dict[int, str]:
    """Task class id -> name of what the folders predict. A single model predicts task
    ids; an ensemble's parts predict their own ids, mapped to the task's by class name."""
    if len(folders) == 1:
        return folder_labels(folders[0])
    task_id_of = task_class_ids(task)
    names = {name for folder in folders for name in folder_labels(folder).values()}
    return {task_id_of[n]: n for n in names if n in task_id_of}


def task_class_ids(task: str) -> dict[str, int]:
    """Class name -> the task's class id (TotalSegmentator's class map)."""
    from totalsegmentator.map_to_binary import class_map

    return {name: value for value, name in class_map[task].items()}


class TotalSegEnsemble:
    """TotalSegmentator's full-resolution mode: every part model runs on the same input,
    and each part's classes are written into one map of the task's class ids, later
    parts over earlier ones where both claim a voxel (as TotalSegmentator combines them)."""

    def __init__(self, spec: ModelSpec, device: object) -> None:
        from inference.nnunet_runner import NnUNetRunner

        task_id_of = task_class_ids(str(spec.task))
        self.parts = []
        for folder in spec.parts:
            runner = NnUNetRunner(spec.model_copy(update={"folder": folder}), device)
            lut = np.zeros(256, dtype=np.uint8)
            for local, name in folder_labels(folder).items():
                lut[local] = task_id_of.get(name, 0)
            self.parts.append((runner, lut))

    def predict(self, channels: np.ndarray, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
        combined: np.ndarray | None = None
        for runner, lut in self.parts:
            part = lut[runner.predict(channels, spacing_zyx)]
            if combined is None:
                combined = part
            else:
                np.copyto(combined, part, where=part > 0)
        assert combined is not None
        return combined

    def close(self) -> None:
        for runner, _ in self.parts:
            runner.close()
