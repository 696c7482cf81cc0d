"""The model registry refuses broken models at start, naming the model and the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from dicom_node.rules import load_rules
from inference.registry import RegistryError, load_registry
from kernel.settings import REPO_ROOT
from tests.test_engine_support import registry_file, require_model


def _copy_model(tmp_path: Path) -> tuple[Path, Path]:
    folder = shutil.copytree(require_model("tumor"), tmp_path / "tumor")
    return folder, registry_file(tmp_path, ["tumor"], tumor={"folder": str(folder)})


def test_shipped_registry_and_pipelines_parse() -> None:
    registry = load_registry(REPO_ROOT / "models.yaml", check_folders=False)
    assert "tumor" in registry.models
    known = {m: s.channels for m, s in registry.models.items()}
    rules = load_rules(REPO_ROOT / "routing_rules.yaml", known_models=known)
    assert rules.pipelines["tumor"].inputs == {"image": ["P", "A"]}


def test_missing_model_folder_names_the_model(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    body = yaml.safe_load((REPO_ROOT / "models.yaml").read_text())["models"]["tumor"]
    path.write_text(yaml.safe_dump({"models": {"tumor": {**body, "folder": "nowhere"}}}))
    with pytest.raises(RegistryError, match=r"model 'tumor': folder .*nowhere does not exist"):
        load_registry(path)


def test_labels_that_disagree_with_dataset_json_fail(tmp_path: Path) -> None:
    folder, path = _copy_model(tmp_path)
    dataset = json.loads((folder / "dataset.json").read_text())
    dataset["labels"]["cyst"] = 3
    (folder / "dataset.json").write_text(json.dumps(dataset))
    with pytest.raises(RegistryError, match=r"model 'tumor': labels \[1, 2\] do not match"):
        load_registry(path)


def test_checkpoint_with_other_class_count_fails(tmp_path: Path) -> None:
    folder, path = _copy_model(tmp_path)
    dataset = json.loads((folder / "dataset.json").read_text())
    dataset["labels"]["cyst"] = 3
    (folder / "dataset.json").write_text(json.dumps(dataset))
    raw = yaml.safe_load(path.read_text())
    raw["models"]["tumor"]["labels"][3] = {**raw["models"]["tumor"]["labels"][1], "name": "cyst"}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RegistryError, match=r"model 'tumor': checkpoint .* predicts 3 classes"):
        load_registry(path)


def test_missing_totalsegmentator_weights_name_task_and_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path / "weights"))
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "home"))
    path = tmp_path / "models.yaml"
    label = {"name": "spleen", "category": ["SCT", "91723000", "Anatomical Structure"],
             "type": ["SCT", "78961009", "Spleen"]}  # fmt: skip
    entry = {"kind": "totalsegmentator", "task": "total", "fast": True, "version": "1",
             "labels": {1: label}}  # fmt: skip
    path.write_text(yaml.safe_dump({"models": {"organs": entry}}))
    with pytest.raises(RegistryError) as info:
        load_registry(path)
    message = str(info.value)
    assert "model 'organs' (TotalSegmentator task 'total')" in message
    assert "Dataset297_TotalSegmentator_total_3mm_1559subj" in message
    assert "nothing is downloaded" in message
    assert not (tmp_path / "weights").exists() or not any((tmp_path / "weights").rglob("*.pth"))
