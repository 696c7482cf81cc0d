"""The engine: warm models, one read per series, resampling, crop-then-paste, clean-up."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml

from devkit.memwatch import peak_rss
from inference.crop import crop_volume, label_box
from inference.engine import Engine
from inference.model_cache import ModelCache
from inference.nifti_io import write_volume
from inference.postprocess import postprocess
from inference.registry import PostProcessSpec, load_registry
from inference.volume import Volume, resample_to
from kernel.catalog import CropSpec, PipelineSpec
from tests.test_engine_support import (
    dice,
    grid,
    phantom_volume,
    registry_file,
    require_model,
    truth_of,
)

CPU = torch.device("cpu")
NNUNET_CLI = Path(__file__).resolve().parent.parent / ".venv/bin/nnUNetv2_predict_from_modelfolder"
SHIPPED = sorted(load_registry(check_folders=False).models)  # models.yaml
PHASES = {"totalseg": "P", "vessel": "AP", "ureter": "D", "tumor": "P", "organs_6mm": "N"}


@pytest.mark.parametrize("name", SHIPPED)
def test_prediction_equals_nnunet_cli(name: str, tmp_path: Path) -> None:
    """In-process prediction == nnUNetv2_predict_from_modelfolder on the same NIfTI input."""
    require_model(name)
    engine = Engine(load_registry(registry_file(tmp_path, [name])), CPU)
    spec = engine.registry.get(name)
    volumes = {
        c: phantom_volume(p, grid())[0] for c, p in zip(spec.channels, PHASES[name], strict=True)
    }
    src, out = tmp_path / "in", tmp_path / "out"
    for i, channel in enumerate(spec.channels):
        write_volume(volumes[channel], src / f"case_{i:04d}.nii.gz")
    cli = [str(NNUNET_CLI), "-i", str(src), "-o", str(out), "-m", str(spec.model_folder),
           "-f", "0", "-chk", spec.checkpoint, "-step_size", str(spec.tile_step_size),
           "-device", "cpu", "-npp", "1", "-nps", "1"]  # fmt: skip
    if not spec.use_mirroring:
        cli.append("--disable_tta")
    # The CLI spends most of its ~15 s importing torch in itself and in the two processes
    # it spawns: our prediction runs meanwhile instead of after it.
    with subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        try:
            ours = engine.predict(name, volumes)
            log = proc.communicate(timeout=300)[0]
        finally:
            proc.kill()
    assert proc.returncode == 0, log.decode(errors="replace")[-3000:]
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case.nii.gz")))
    assert theirs.shape == ours.shape
    for value in spec.labels:
        assert dice(ours == value, theirs == value) >= 0.999, spec.labels[value].name


def test_secondary_phase_lands_in_reference_geometry() -> None:
    """A P series with another field of view and slice spacing, resampled into A's grid,
    puts the vessels where A's truth has them."""
    a, truth_a = phantom_volume("A", grid())
    p, _ = phantom_volume(
        "P", grid(rows=100, columns=110, pixel_spacing_mm=3.7, slice_thickness_mm=5.0,
                  xy_offset_mm=(12.0, -9.0), z_offset_mm=7.0)
    )  # fmt: skip
    p_in_a = resample_to(p, a)
    assert p_in_a.shape == a.shape
    for name, low_hu in (("aorta", 120), ("inferior_vena_cava", 110)):
        found = (p_in_a > low_hu) & truth_of(truth_a, "aorta", "inferior_vena_cava")
        assert dice(found, truth_of(truth_a, "aorta", "inferior_vena_cava")) >= 0.9, name


def test_vessel_model_output_is_in_the_arterial_geometry(tmp_path: Path) -> None:
    """vessel (A + P): P with another field of view, pixel and slice spacing is resampled
    into A's grid; the labels land on A's truth. (The stand-in was trained with both phases
    on one grid, so a much coarser P, e.g. 3.7 mm / 5 mm, blurs its aorta to Dice ~0.87.)"""
    engine = Engine(load_registry(registry_file(tmp_path, ["vessel"])), CPU)
    # A on a scanner-like 2 mm grid; P coarser, shifted, with thicker slices.
    a, truth_a = phantom_volume(
        "A", grid(rows=192, columns=192, pixel_spacing_mm=2.0, slice_thickness_mm=2.5)
    )
    p, _ = phantom_volume(
        "P", grid(rows=170, columns=190, pixel_spacing_mm=2.3, slice_thickness_mm=3.0,
                  xy_offset_mm=(12.0, -9.0), z_offset_mm=7.0)
    )  # fmt: skip
    labels = engine.predict("vessel", {"A": a, "P": p})
    assert labels.shape == a.shape
    for value, names in ((1, ("kidney_left", "kidney_right")), (2, ("aorta",)),
                         (3, ("inferior_vena_cava",))):  # fmt: skip
        assert dice(labels == value, truth_of(truth_a, *names)) >= 0.9, names


def test_crop_then_paste_matches_full_volume(tmp_path: Path) -> None:
    engine = Engine(load_registry(registry_file(tmp_path, ["tumor"])), CPU)
    # On the model's own 2 mm grid, so both runs see the same voxels (no resampling).
    volume, truth = phantom_volume(
        "P", grid(rows=176, columns=176, pixel_spacing_mm=2.0, slice_thickness_mm=2.0)
    )
    inputs = {"image": volume}
    engine.predict("tumor", {"image": crop_volume(volume, (slice(0, 8),) * 3)})  # warm up
    with peak_rss() as full_mem:
        full = engine.predict("tumor", inputs)
    kidneys = np.isin(truth, [4, 5]).astype(np.uint8)
    box = label_box(kidneys, [1], volume.spacing_zyx, margin_mm=20)
    with peak_rss() as crop_mem:
        cropped = engine.predict("tumor", inputs, box)
    assert cropped.shape == full.shape
    for value in (1, 2):  # kidney, tumour: over the whole volume
        assert (full == value).sum() > 100
        assert dice(cropped == value, full == value) >= 0.98
    # Peak memory is a benchmark number (bench/bench_engine.py), not a test assertion: in a
    # long test process RSS growth is dominated by what earlier tests left behind.
    print(f"peak RSS growth: full {full_mem.growth_mb:.0f} MB, crop {crop_mem.growth_mb:.0f} MB")


def test_crop_reuses_the_organ_pipelines_label_map(tmp_path: Path) -> None:
    """totalseg's kidneys crop the tumour model; the organ model runs once for both."""
    engine = Engine(load_registry(registry_file(tmp_path, ["totalseg", "tumor"])), CPU)
    volume, truth = phantom_volume("P", grid(rows=128, columns=128, pixel_spacing_mm=3.0))
    calls: list[str] = []
    for model_id in ("totalseg", "tumor"):
        runner = engine.runner(model_id)
        real = runner.predict
        runner.predict = lambda *a, _real=real, _id=model_id: calls.append(_id) or _real(*a)
    organs = PipelineSpec(models=["totalseg"], inputs={"image": ["P"]})
    tumor = PipelineSpec(
        models=["tumor"],
        inputs={"image": ["P"]},
        crop=CropSpec(to_model="totalseg", labels=["kidney_left", "kidney_right"], margin_mm=20),
    )
    organ_result = engine.run("totalseg", organs, {"image": volume})
    tumor_result = engine.run("tumor", tumor, {"image": volume})
    assert calls == ["totalseg", "tumor"]
    box = tumor_result.crop_box
    assert box is not None
    assert np.prod([s.stop - s.start for s in box]) < 0.5 * np.prod(volume.shape)
    kidneys = truth_of(truth, "kidney_left", "kidney_right")
    assert dice(tumor_result.label_map == 1, kidneys) >= 0.9
    names = {label.value: label.name for label in organ_result.labels}
    assert set(names.values()) >= {"kidney_left", "kidney_right", "liver", "spleen"}


def test_label_maps_are_cached_by_content_not_by_name(tmp_path: Path) -> None:
    """The same series name with other voxels (a rewritten NIfTI) is predicted afresh."""
    engine = Engine(load_registry(registry_file(tmp_path, ["tumor"])), CPU)
    volume, _ = phantom_volume("P", grid())
    first = engine.predict_cached("tumor", {"image": volume})
    assert (first == 1).sum() > 100
    air = Volume(np.full_like(volume.array, -1000.0), volume.spacing_zyx, volume.origin_lps,
                 volume.direction, series_uid=volume.series_uid)  # fmt: skip
    assert air.digest != volume.digest
    assert not engine.predict_cached("tumor", {"image": air}).any()
    same = Volume(volume.array.copy(), volume.spacing_zyx, volume.origin_lps,
                  volume.direction, series_uid="another name")  # fmt: skip
    assert engine.predict_cached("tumor", {"image": same}) is first


def test_series_is_read_once_per_worker() -> None:
    engine = Engine(load_registry(Path("/dev/null"), check_folders=False), CPU)
    reads = []

    def load():
        reads.append(1)
        return phantom_volume("A", grid(rows=16, columns=16))[0]

    first = engine.volume("series:1.2.3:40", load)
    assert engine.volume("series:1.2.3:40", load) is first
    assert len(reads) == 1


def test_model_cache_evicts_least_recently_used_over_budget() -> None:
    closed: list[str] = []

    class Fake:
        def __init__(self, name: str) -> None:
            self.name = name

        def close(self) -> None:
            closed.append(self.name)

    cache = ModelCache(budget_mb=300)
    a = cache.get("a", 100, lambda: Fake("a"))
    cache.get("b", 100, lambda: Fake("b"))
    assert cache.get("a", 100, lambda: Fake("a2")) is a  # warm: no reload
    cache.get("c", 150, lambda: Fake("c"))
    assert closed == ["b"] and cache.loaded() == ["a", "c"]
    assert cache.loads == 3


def test_postprocess_keeps_largest_component_and_drops_small_ones() -> None:
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:8, 2:8, 2:8] = 1  # big
    labels[12:14, 12:14, 12:14] = 1  # small island
    labels[10:12, 2:4, 2:4] = 2  # 8 voxels = 0.008 ml at 1 mm
    labels[4, 4, 4] = 0  # a hole
    specs = {
        1: PostProcessSpec(largest_component=True, fill_holes=True),
        2: PostProcessSpec(min_volume_ml=0.01),
    }
    out = postprocess(labels, specs, (1.0, 1.0, 1.0))
    assert (out == 1).sum() == 216 and (out == 2).sum() == 0
    assert out[4, 4, 4] == 1


def test_registry_yaml_postprocess_and_confidence_parse(tmp_path: Path) -> None:
    path = registry_file(tmp_path, ["tumor"], tumor={"min_confidence": 0.6})
    raw = yaml.safe_load(path.read_text())
    raw["models"]["tumor"]["labels"][1]["postprocess"] = {"largest_component": True}
    path.write_text(yaml.safe_dump(raw))
    spec = load_registry(path).get("tumor")
    assert spec.min_confidence == 0.6 and spec.labels[1].postprocess.largest_component
