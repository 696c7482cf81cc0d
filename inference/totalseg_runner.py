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


def resolve_task_folder(spec: ModelSpec) -> Path:
    """The installed model folder for a registry entry of kind ``totalsegmentator``."""
    where = f"model {spec.id!r} (TotalSegmentator task {spec.task!r})"
    try:
        folders = task_folders(str(spec.task), fast=spec.fast, fastest=spec.fastest)
    except (ValueError, KeyError) as exc:
        raise RegistryError(f"{where}: unknown task or mode: {exc}") from None
    if len(folders) != 1:
        raise RegistryError(
            f"{where}: the full-resolution mode is an ensemble of {len(folders)} models; "
            "use fast: true or fastest: true"
        )
    task_id, folder = folders[0]
    if not folder.is_dir():
        hint = (
            "TOTALSEG_WEIGHTS_PATH"
            if "TOTALSEG_WEIGHTS_PATH" in os.environ
            else ("TOTALSEG_HOME_DIR (or TOTALSEG_WEIGHTS_PATH)")
        )
        raise RegistryError(
            f"{where}: weights for task id {task_id} are not installed: {folder} does not "
            f"exist. Install them there (set {hint}); nothing is downloaded."
        )
    ensure_offline_config()
    dataset = json.loads((folder / "dataset.json").read_text())
    known = {int(v): k for k, v in dataset["labels"].items()}
    for value, label in spec.labels.items():
        if known.get(value) is None:
            raise RegistryError(f"{where}: label {value} ({label.name}) is not an output")
    unknown = [n for n in spec.roi_subset if n not in known.values()]
    if unknown:
        raise RegistryError(f"{where}: roi_subset names unknown classes {unknown}")
    return folder
