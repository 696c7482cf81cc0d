"""Tiny nnU-Net v2 stand-in models trained on the phantom, and the script that makes them.

The node runs real nnU-Net v2 trained-model folders. For tests and the demo we ship tiny
ones trained here on ``devkit.phantom`` so the whole chain runs on a CPU in seconds
and its output can be scored against the phantom's truth. Each folder is exactly what
``nnUNetPredictor.initialize_from_trained_model_folder(folder, (0,))`` loads:
``dataset.json``, ``plans.json`` and ``fold_0/checkpoint_final.pth``; ``standin.json``
records how it was trained and the Dice it reached on held-out seeds.

We do not use nnU-Net's training pipeline (it wants raw / preprocessed dataset folders
and hours); instead a small loop trains on volumes that went through nnU-Net's own
preprocessing (``DefaultPreprocessor.run_case_npy``: CTNormalization with the intensity
properties written to plans.json, then the resampling the plans name), so the network
sees at training time exactly what the predictor will feed it.

Regenerate: ``python -m devkit.standins [--model NAME] [--out models/]``.
Training seeds are >= 1000; every seed below 1000 is held out.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from devkit.phantom import STRUCTURES, Phantom
from devkit.standin_data import (
    CONFIGURATION,
    intensity_properties,
    make_case,
    sample_batch,
    segmentation_loss,
)
from devkit.synth import phantom_volumes, series_geometry

TRAIN_SEED_BASE = 1000
EVAL_SEED = 7
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "models"
# The two grids every model is scored on: the test's small one and a scanner's native one.
EVAL_GRIDS: dict[str, dict[str, float | int]] = {
    "192": {"rows": 192, "columns": 192, "pixel_spacing_mm": 2.0, "slice_thickness_mm": 2.5},
    "512": {"rows": 512, "columns": 512, "pixel_spacing_mm": 0.78, "slice_thickness_mm": 2.5},
}


@dataclass(frozen=True)
class StandinSpec:
    """What one stand-in model sees, predicts and how it is trained."""

    name: str
    dataset_id: int
    description: str
    # Per input channel, the phases a training case may draw that channel from.
    channel_phases: tuple[str, ...]
    # Model label name -> phantom STRUCTURES names it covers; ids follow the order (1, 2, ..).
    labels: dict[str, tuple[str, ...]]
    spacing_zyx: tuple[float, float, float]
    # Inference patch (plans.json): about a whole 400 x 400 x 210 mm series, so the sliding
    # window runs once or twice instead of dozens of overlapping times.
    patch_size: tuple[int, int, int]
    train_patch: tuple[int, int, int]
    features: tuple[int, ...] = (8, 16, 32)
    decoder_convs: int = 2
    steps: int = 600
    batch_size: int = 2
    cases: int = 12
    foreground_fraction: float = 0.5
    # Phantom structures that look like a label (the liver in the portal venous phase looks
    # like a kidney in the delayed one); this fraction of patches is centred on them (a
    # name listed twice is picked twice as often), so the model learns the difference.
    hard_negatives: tuple[str, ...] = ()
    hard_negative_fraction: float = 0.25
    lr: float = 4e-3
    # Test-time mirroring the checkpoint allows (and training augments with). Models with
    # left / right labels must not mirror across x.
    mirror_axes: tuple[int, ...] | None = (2,)
    eval_phases: str = ""  # channel phases for evaluation; default: first of each channel
    # Dice every label must reach on a held-out phantom (tests/test_standin_models.py).
    required_dice: float = 0.9
    # Train and evaluate on closest-canonical (RAS) arrays, the order TotalSegmentator
    # feeds its models (inference/orientation.py), instead of the DICOM order.
    canonical_ras: bool = False

    @property
    def label_ids(self) -> dict[str, int]:
        return {"background": 0, **{name: i + 1 for i, name in enumerate(self.labels)}}

    def truth_lut(self) -> np.ndarray:
        """Lookup table phantom STRUCTURES id -> model label id."""
        lut = np.zeros(256, dtype=np.uint8)
        for model_id, (_, names) in enumerate(self.labels.items(), start=1):
            for name in names:
                lut[STRUCTURES[name]] = model_id
        return lut

    def evaluation_phases(self) -> str:
        return self.eval_phases or "".join(p[0] for p in self.channel_phases)


KIDNEYS = ("kidney_left", "kidney_right")

SPECS: dict[str, StandinSpec] = {
    spec.name: spec
    for spec in (
        StandinSpec(
            name="tumor",
            dataset_id=901,
            description="kidney and kidney tumour on portal venous or arterial CT",
            # The pipeline feeds it P, else A (routing_rules.yaml). In P the liver (110 HU)
            # is close to the tumour (90 HU), so liver patches are the main hard negative.
            channel_phases=("PA",),
            labels={"kidney": KIDNEYS, "kidney_tumor": ("kidney_tumor",)},
            spacing_zyx=(2.0, 2.0, 2.0),
            patch_size=(112, 208, 208),
            train_patch=(32, 64, 64),
            steps=1500,
            cases=16,
            eval_phases="P",
            hard_negatives=("liver", "liver", "liver", "spleen", "inferior_vena_cava", "aorta"),
            hard_negative_fraction=0.3,
        ),
        StandinSpec(
            name="vessel",
            dataset_id=902,
            description="kidney, artery (aorta), vein (IVC) from arterial + portal venous CT",
            channel_phases=("A", "P"),
            labels={"kidney": KIDNEYS, "artery": ("aorta",), "vein": ("inferior_vena_cava",)},
            spacing_zyx=(2.0, 2.0, 2.0),
            patch_size=(112, 208, 208),
            train_patch=(32, 64, 64),
            steps=1500,
            cases=16,
            hard_negatives=("liver", "spleen", "kidney_tumor"),
        ),
        StandinSpec(
            name="ureter",
            dataset_id=903,
            description="ureters and kidneys on delayed (excretory) CT",
            channel_phases=("D",),
            labels={"ureter": ("ureter_left", "ureter_right"), "kidney": KIDNEYS},
            # Ureters are 4-6 mm wide, two or three voxels of a 2 mm grid, so every
            # resampling step costs Dice: the model runs at nnU-Net's own choice along z (the
            # median slice spacing, 2.5 mm) and at 2 mm in-plane. A perfect 1 mm model,
            # resampled back to a 2 mm series, scores only 0.87 on the ureters; at 1 mm the
            # stand-in took 44 s per series on a CPU. On 0.78 mm series the 2 mm outline
            # costs Dice instead (see standin.json); production ureter models run finer.
            spacing_zyx=(2.5, 2.0, 2.0),
            patch_size=(92, 208, 208),
            train_patch=(32, 80, 80),
            steps=1500,
            cases=16,
            hard_negatives=("vertebra", "liver", "aorta", "inferior_vena_cava", "kidney_tumor"),
        ),
        StandinSpec(
            name="totalseg",
            dataset_id=904,
            description="a few TotalSegmentator organs on portal venous CT",
            channel_phases=("P",),
            labels={
                "spleen": ("spleen",),
                "kidney_right": ("kidney_right",),
                "kidney_left": ("kidney_left",),
                "liver": ("liver",),
                "aorta": ("aorta",),
                "inferior_vena_cava": ("inferior_vena_cava",),
            },
            spacing_zyx=(3.0, 3.0, 3.0),
            patch_size=(72, 136, 136),
            train_patch=(32, 80, 80),
            steps=2500,
            cases=24,
            features=(8, 16, 24, 32),
            decoder_convs=1,
            # Spleen and liver share HU in P: only position tells them apart.
            hard_negatives=("spleen", "spleen", "liver", "kidney_tumor", "ureter_left"),
            mirror_axes=None,
        ),
    )
}

# Organs at 6 mm on every contrast phase: the coarse organ model whose masks the phase
# classifier measures HU in (aorta, IVC, kidneys), like TotalSegmentator's 6 mm task. It is
# trained on N, A, P and D, so the vessels are found unenhanced and enhanced alike.
SPECS["organs_6mm"] = StandinSpec(
    name="organs_6mm",
    dataset_id=906,
    description="aorta, IVC, kidneys, liver and spleen at 6 mm on any contrast phase",
    channel_phases=("NAPD",),
    labels=dict(SPECS["totalseg"].labels),
    spacing_zyx=(6.0, 6.0, 6.0),
    patch_size=(40, 72, 72),
    train_patch=(24, 48, 48),
    steps=600,
    cases=16,
    features=(8, 16, 24),
    decoder_convs=1,
    hard_negatives=("spleen", "liver", "kidney_tumor", "ureter_left", "vertebra"),
    mirror_axes=None,
    eval_phases="N",  # the hardest phase for the vessels
    # 6 mm voxels: the aorta is three or four voxels wide, so outlines score lower; the
    # model's use is to find a structure's inside for HU medians, not to outline it.
    required_dice=0.75,
)

# The same organs in the voxel order TotalSegmentator feeds its models (closest-canonical
# RAS): the source of the TotalSegmentator weights folder the tests install.
SPECS["totalseg_ras"] = replace(
    SPECS["totalseg"],
    name="totalseg_ras",
    dataset_id=905,
    description="totalseg in TotalSegmentator's canonical (RAS) voxel order",
    canonical_ras=True,
)


# --- nnU-Net files ----------------------------------------------------------------------


def dataset_json(spec: StandinSpec, num_training: int) -> dict:
    return {
        "name": f"Dataset{spec.dataset_id}_Standin{spec.name.capitalize()}",
        "description": f"dicom_node phantom stand-in: {spec.description}",
        "channel_names": {str(i): "CT" for i in range(len(spec.channel_phases))},
        "labels": spec.label_ids,
        "numTraining": num_training,
        "file_ending": ".nii.gz",
    }


def plans_json(spec: StandinSpec, intensity_props: dict[str, dict[str, float]]) -> dict:
    """A plans.json in nnU-Net v2.8 layout with one ``3d_fullres`` configuration."""
    n = len(spec.features)
    conv = "torch.nn.modules.conv.Conv3d"
    # Torch resampling (nnU-Net's *_torchres planners): a 512x512 series is resampled in
    # well under a second, where the default order-3 skimage path takes several.
    resample = {"is_seg": False, "force_separate_z": False, "memefficient_seg_resampling": False}
    configuration = {
        "data_identifier": f"nnUNetPlans_{CONFIGURATION}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": spec.batch_size,
        "patch_size": list(spec.patch_size),
        "median_image_size_in_voxels": [100, 200, 200],
        "spacing": list(spec.spacing_zyx),
        "normalization_schemes": ["CTNormalization"] * len(spec.channel_phases),
        "use_mask_for_norm": [False] * len(spec.channel_phases),
        "resampling_fn_data": "resample_torch_fornnunet",
        "resampling_fn_seg": "resample_torch_fornnunet",
        "resampling_fn_data_kwargs": resample,
        "resampling_fn_seg_kwargs": {**resample, "is_seg": True},
        "resampling_fn_probabilities": "resample_torch_fornnunet",
        "resampling_fn_probabilities_kwargs": resample,
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {
                "n_stages": n,
                "features_per_stage": list(spec.features),
                "conv_op": conv,
                "kernel_sizes": [[3, 3, 3]] * n,
                "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
                "n_conv_per_stage": [2] * n,
                "n_conv_per_stage_decoder": [spec.decoder_convs] * (n - 1),
                "conv_bias": True,
                # No normalisation layers: the inputs are CT-normalised already, and without
                # instance norm the output does not depend on the patch size, so training on
                # small patches and predicting on a whole-series patch agree (and it is 2x
                # faster on a CPU).
                "norm_op": None,
                "norm_op_kwargs": None,
                "dropout_op": None,
                "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU",
                "nonlin_kwargs": {"inplace": True},
            },
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
        "batch_dice": True,
    }
    return {
        "dataset_name": dataset_json(spec, 0)["name"],
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [2.5, 0.78, 0.78],
        "original_median_shape_after_transp": [85, 512, 512],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {CONFIGURATION: configuration},
        "experiment_planner_used": "dicom_node.inference.standins",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": intensity_props,
    }


def build_network(plans: dict, dataset: dict) -> torch.nn.Module:
    """The network exactly as nnUNetPredictor rebuilds it from these plans."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    configuration = plans_manager.get_configuration(CONFIGURATION)
    return nnUNetTrainer.build_network_architecture(
        plans_manager,
        configuration,
        len(dataset["channel_names"]),
        plans_manager.get_label_manager(dataset).num_segmentation_heads,
        enable_deep_supervision=False,
    )


# --- training, export, evaluation -------------------------------------------------------


def _log(message: str) -> None:
    print(message, flush=True)


def train(spec: StandinSpec, out_root: Path, *, steps: int | None = None, log=_log) -> Path:
    """Train ``spec`` and write its nnU-Net model folder under ``out_root/<name>``."""
    torch.set_num_threads(2)
    # Without normalisation layers activations can drift into denormal floats, which are
    # an order of magnitude slower on a CPU.
    torch.set_flush_denormal(True)
    torch.manual_seed(spec.dataset_id)
    t0 = time.perf_counter()
    seeds = [TRAIN_SEED_BASE + spec.dataset_id * 100 + i for i in range(spec.cases)]
    dataset = dataset_json(spec, len(seeds))
    plans = plans_json(spec, intensity_properties(spec, seeds[: max(4, len(seeds) // 2)]))
    cases = [make_case(spec, seed, plans, dataset) for seed in seeds]
    t_data = time.perf_counter() - t0
    log(f"[{spec.name}] {len(cases)} cases preprocessed in {t_data:.1f} s")

    network = build_network(plans, dataset)
    steps = steps or spec.steps
    optimizer = torch.optim.Adam(network.parameters(), lr=spec.lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=spec.lr, total_steps=steps, pct_start=0.1
    )
    rng = np.random.default_rng([spec.dataset_id, 2])
    network.train()
    running = 0.0
    for step in range(1, steps + 1):
        x, y = sample_batch(spec, cases, rng)
        loss = segmentation_loss(network(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 12.0)
        optimizer.step()
        scheduler.step()
        value = float(loss.detach())
        running = 0.95 * running + 0.05 * value if step > 1 else value
        if step % 50 == 0 or step == steps:
            log(f"[{spec.name}] step {step}/{steps} loss {running:.3f}")
    train_s = time.perf_counter() - t0
    folder = _export(spec, out_root, network, plans, dataset)
    log(f"[{spec.name}] trained in {train_s:.0f} s -> {folder}")
    _write_record(folder, {"train_seeds": seeds, "train_steps": steps, "train_time_s": train_s})
    return folder


def _export(
    spec: StandinSpec, out_root: Path, network: torch.nn.Module, plans: dict, dataset: dict
) -> Path:
    folder = Path(out_root) / spec.name
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
    (folder / "plans.json").write_text(json.dumps(plans, indent=2) + "\n")
    checkpoint = {
        # state_dict() as is: the decoder shares the encoder's tensors, and torch.save
        # stores shared storage once (cloning would double the checkpoint).
        "network_weights": network.state_dict(),
        "init_args": {
            "plans": plans,
            "configuration": CONFIGURATION,
            "fold": 0,
            "dataset_json": dataset,
            "device": "cpu",
        },
        "trainer_name": "nnUNetTrainer",
        # Without this key nnU-Net silently disables test-time mirroring.
        "inference_allowed_mirroring_axes": spec.mirror_axes,
        "current_epoch": 1,
        "optimizer_state": None,
        "grad_scaler_state": None,
        "logging": {},
        "_best_ema": None,
    }
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    return folder


def _write_record(folder: Path, update: dict) -> None:
    path = folder / "standin.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    record.update(update)
    path.write_text(json.dumps(record, indent=2) + "\n")


def load_predictor(folder: Path, *, use_mirroring: bool = True):
    """An in-process CPU nnUNetPredictor for a stand-in folder."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_mirroring=use_mirroring,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(
        str(folder), use_folds=(0,), checkpoint_name="checkpoint_final.pth"
    )
    return predictor


def dice_per_label(prediction: np.ndarray, truth: np.ndarray, labels: dict[str, int]) -> dict:
    result = {}
    for name, label in labels.items():
        if label == 0:
            continue
        p, t = prediction == label, truth == label
        denominator = int(p.sum()) + int(t.sum())
        result[name] = 1.0 if denominator == 0 else 2.0 * int((p & t).sum()) / denominator
    return result


def evaluate(
    spec: StandinSpec, folder: Path, *, seed: int = EVAL_SEED, grid: str = "192",
    use_mirroring: bool = True,
) -> dict:  # fmt: skip
    """Dice per label on a held-out seed at one of ``EVAL_GRIDS``, through nnU-Net's predictor
    (its own resampling to the model spacing and back included)."""
    predictor = load_predictor(folder, use_mirroring=use_mirroring)
    geometry = series_geometry(Phantom(seed), **EVAL_GRIDS[grid])  # type: ignore[arg-type]
    phases = spec.evaluation_phases()
    volumes, truth = phantom_volumes(seed, phases, geometry)
    images = np.stack([volumes[p] for p in phases]).astype(np.float32)
    t0 = time.perf_counter()
    if spec.canonical_ras:  # identity-direction phantom grids: RAS = x and y mirrored
        images = np.ascontiguousarray(images[:, :, ::-1, ::-1])
    prediction = predictor.predict_single_npy_array(
        images, {"spacing": list(geometry.spacing_zyx)}, None, None, False
    )
    if spec.canonical_ras:
        prediction = np.ascontiguousarray(prediction[:, ::-1, ::-1])
    seconds = time.perf_counter() - t0
    dice = dice_per_label(prediction, spec.truth_lut()[truth], spec.label_ids)
    return {
        "seed": seed,
        "grid": grid,
        "shape_zyx": list(geometry.shape_zyx),
        "phases": phases,
        "use_mirroring": use_mirroring,
        "dice": {k: round(v, 4) for k, v in dice.items()},
        "inference_s": round(seconds, 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(SPECS), action="append", help="default: all")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=None, help="override training steps")
    parser.add_argument("--eval-only", action="store_true", help="re-score existing folders")
    args = parser.parse_args(argv)
    for name in args.model or sorted(SPECS):
        spec = SPECS[name]
        folder = args.out / name if args.eval_only else train(spec, args.out, steps=args.steps)
        scores = {g: evaluate(spec, folder, grid=g) for g in EVAL_GRIDS}
        for g, s in scores.items():
            _log(f"[{name}] seed {s['seed']} grid {g}: dice {s['dice']} ({s['inference_s']} s)")
        _write_record(folder, {"evaluation": scores})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# --- TotalSegmentator layout --------------------------------------------------------------


def make_totalsegmentator_weights(
    source: Path, weights_root: Path, task: str = "total", *, fast: bool = True
) -> list[Path]:
    """Install the ``totalseg`` stand-in as TotalSegmentator's weights for ``task``.

    TotalSegmentator finds a task's models by folder name under its weights folder
    (``Dataset297_TotalSegmentator_total_3mm_1559subj/<trainer>__nnUNetPlans__3d_fullres``
    for ``total --fast``; five part folders, Dataset291-295, for the full-resolution
    ensemble) and expects every class of each model's class map as an output. The
    stand-in's few organs carry TotalSegmentator's names, so its segmentation head is
    widened to each class map: an organ's row goes to that organ's id in the map, every
    other class gets a logit far below background and is never predicted (a part without
    any of the organs predicts background only). TotalSegmentator feeds its models
    closest-canonical (RAS) arrays, so the source must be a stand-in trained in that order
    (``totalseg_ras``). The result is a weights folder on which TotalSegmentator's own code
    runs offline. Returns the model folders written.
    """
    from totalsegmentator.libs import TASK_ID_WEIGHTS_CONFIGS
    from totalsegmentator.map_to_binary import class_map, class_map_5_parts
    from totalsegmentator.map_to_binary import map_taskid_to_partname_ct as part_names
    from totalsegmentator.python_api import get_task_config

    config = get_task_config(task, fast=fast, fastest=False, quiet=True)
    task_ids = config["task_id"] if isinstance(config["task_id"], list) else [config["task_id"]]
    inner = f"{config['trainer']}__{config.get('plans') or 'nnUNetPlans'}__{config['model']}"
    dataset = json.loads((Path(source) / "dataset.json").read_text())
    ours = {int(v): k for k, v in dataset["labels"].items()}  # our id -> name
    written = []
    for task_id in task_ids:
        info = TASK_ID_WEIGHTS_CONFIGS[task_id]
        folder = Path(weights_root) / info["foldername"] / inner
        (folder / "fold_0").mkdir(parents=True, exist_ok=True)
        # id -> class name of this model's outputs
        names = class_map[task] if len(task_ids) == 1 else class_map_5_parts[part_names[task_id]]
        ids = {name: value for value, name in names.items()}
        # An organ of another part gets an extra class after the part's own ones, named
        # so that neither TotalSegmentator's merge nor ours maps it to anything: the part
        # reads it as background, as a part model trained without that organ would (a
        # part lacking it altogether would put its nearest class there instead, which
        # then overwrites the organ in the merge).
        foreign = [n for n in ours.values() if n != "background" and n not in ids]
        last = max(names)
        names = {**names, **{last + 1 + i: f"not_in_part_{n}" for i, n in enumerate(foreign)}}
        ids = {name: value for value, name in names.items()}
        ids["background"] = 0
        target_of = {our: ids.get(n, ids.get(f"not_in_part_{n}")) for our, n in ours.items()}
        n_out = max(names) + 1

        checkpoint_path = Path(source) / "fold_0" / "checkpoint_final.pth"
        checkpoint = torch.load(checkpoint_path, weights_only=False)
        weights = checkpoint["network_weights"]
        for key in [k for k in weights if ".seg_layers." in k]:
            old = weights[key]
            new = torch.zeros((n_out, *old.shape[1:]), dtype=old.dtype)
            if key.endswith(".bias"):
                new.fill_(-50.0)  # never the argmax; small enough for nnU-Net's float16 sums
            for our, target in target_of.items():
                new[target] = old[our]
            weights[key] = new
        full_dataset = {
            **dataset,
            "name": info["foldername"],
            "labels": {"background": 0, **{names[i]: i for i in sorted(names)}},
        }
        plans = json.loads((Path(source) / "plans.json").read_text())
        plans["dataset_name"] = info["foldername"]
        checkpoint["init_args"]["dataset_json"] = full_dataset
        checkpoint["init_args"]["plans"] = plans
        (folder / "dataset.json").write_text(json.dumps(full_dataset, indent=2) + "\n")
        (folder / "plans.json").write_text(json.dumps(plans, indent=2) + "\n")
        torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
        written.append(folder)
    return written
