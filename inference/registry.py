"""The model registry (``models.yaml``): which trained models exist and what they output.

Validated at start: a model whose folder is missing, whose labels disagree with the
nnU-Net ``dataset.json`` or the checkpoint's output layer, whose checkpoint differs from
its sha256 pin or names code to run (``inference.checkpoints``), or a TotalSegmentator task
whose weights are not installed, fails with a message naming the model and the problem.
Nothing here imports torch or loads a model (the node process runs this at start; models
load only in the worker, ``inference.nnunet_runner``), and nothing ever downloads weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from inference.checkpoints import SHA256_RE, CheckpointError, check_pin, read_checkpoint
from inference.labels import Code, SegmentLabel
from inference.orientation import check_orientation
from kernel.settings import REPO_ROOT
from kernel.strict import StrictModel


class RegistryError(ValueError):
    """The model registry is invalid; the message names the model and the problem."""


class CodeSpec(StrictModel):
    """A coded concept written as ``[scheme, value, meaning]`` in YAML."""

    scheme: str
    value: str
    meaning: str

    def to_code(self) -> Code:
        return Code(value=self.value, scheme=self.scheme, meaning=self.meaning)


def _code(v: object) -> object:
    if isinstance(v, list | tuple) and len(v) == 3:
        return {"scheme": str(v[0]), "value": str(v[1]), "meaning": str(v[2])}
    return v


class PostProcessSpec(StrictModel):
    """Per-label clean-up after inference (in the reference geometry)."""

    largest_component: bool = False  # keep only the largest connected component
    min_volume_ml: float = Field(0.0, ge=0)  # drop components smaller than this
    fill_holes: bool = False  # fill enclosed holes, slice-independent (3D)
    smooth_mm: float = Field(0.0, ge=0)  # Gaussian smoothing of the mask (sigma, mm)


class LabelSpec(StrictModel):
    name: str
    category: CodeSpec
    type: CodeSpec
    color: tuple[int, int, int] | None = None
    laterality: CodeSpec | None = None
    postprocess: PostProcessSpec = Field(default_factory=PostProcessSpec)

    _codes = field_validator("category", "type", "laterality", mode="before")(
        classmethod(lambda cls, v: _code(v))
    )


# The voxel order a model was trained in when models.yaml does not say (see ModelSpec).
DEFAULT_ORIENTATION = {"nnunet": "LPS", "totalsegmentator": "RAS"}


class ModelSpec(StrictModel):
    """One model of the registry (an entry of ``models.yaml``).

    ``kind: nnunet`` is an nnU-Net v2 trained-model folder (``folder`` with dataset.json,
    plans.json, ``fold_N/<checkpoint>``); ``kind: totalsegmentator`` a TotalSegmentator
    task whose folder is resolved from the installed weights. ``channels`` names the input
    role feeding each nnU-Net channel (channel 0 is the reference geometry); ``labels``
    maps label id -> meaning, colour and post-processing. ``memory_mb`` (warm predictor)
    and ``gpu_memory_mb`` (free GPU memory a job needs) are MiB. ``orientation`` is the
    voxel order the model was trained in (an orientation code such as ``LPS``; always set
    after validation): the engine turns every input into it and the output back.
    """

    id: str
    kind: Literal["nnunet", "totalsegmentator"] = "nnunet"
    # nnunet: the trained-model folder. totalsegmentator: resolved from the task at start.
    folder: Path | None = None
    version: str
    description: str = ""
    configuration: str = "3d_fullres"
    folds: list[int | Literal["all"]] = Field(default_factory=lambda: [0])
    checkpoint: str = "checkpoint_final.pth"
    use_mirroring: bool = True
    tile_step_size: float = Field(0.5, gt=0, le=1)
    gpu_memory_mb: int = Field(0, ge=0)  # GPU memory a job needs free before it starts
    # Memory the warm predictor holds (weights + workspace); the LRU model cache budget.
    memory_mb: int = Field(256, ge=1)
    # Voxels whose winning class probability is below this become background (None: argmax).
    min_confidence: float | None = Field(None, gt=0, lt=1)
    # TotalSegmentator tasks: the task name, its resolution and an optional ROI subset.
    task: str | None = None
    fast: bool = True  # 3 mm model (False: the 1.5 mm ensemble of five)
    fastest: bool = False  # 6 mm model
    roi_subset: list[str] = Field(default_factory=list)
    # Resolved at validation for TotalSegmentator's full-resolution ensemble: one model
    # folder per part (organs, vertebrae, cardiac, muscles, ribs); ``folder`` is the first.
    parts: list[Path] = Field(default_factory=list)
    # Which input phase / role feeds which nnU-Net channel, in channel order.
    channels: list[str] = Field(default_factory=lambda: ["image"])
    # The voxel order the model was trained in: the patient direction each index axis
    # (x, y, z) runs towards. Default by kind (DEFAULT_ORIENTATION): nnunet LPS (DICOM's
    # head-first supine axial order), totalsegmentator RAS (nibabel's closest canonical,
    # which TotalSegmentator feeds its models; no other value is allowed for it).
    orientation: str | None = None
    labels: dict[int, LabelSpec]
    # sha256 of each checkpoint file, by its path relative to the model folder (nnunet:
    # ``fold_0/checkpoint_final.pth``) or to TotalSegmentator's weights directory. Every
    # checkpoint of an nnunet model must be pinned; a file that differs is refused.
    sha256: dict[str, str] = Field(default_factory=dict)
    # Resolved at validation: absolute checkpoint path -> pinned sha256 (what loaders check).
    pins: dict[str, str] = Field(default_factory=dict)

    @field_validator("sha256")
    @classmethod
    def _sha256_hex(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k, digest in v.items() if not SHA256_RE.match(str(digest).lower())]
        if bad:
            raise ValueError(f"{bad}: a sha256 is 64 hexadecimal digits")
        return {str(k): str(digest).lower() for k, digest in v.items()}

    @field_validator("orientation")
    @classmethod
    def _orientation_code(cls, v: str | None) -> str | None:
        return None if v is None else check_orientation(v)

    @model_validator(mode="after")
    def _orientation_default(self) -> ModelSpec:
        if self.orientation is None:
            self.orientation = DEFAULT_ORIENTATION[self.kind]
        elif self.kind == "totalsegmentator" and self.orientation != "RAS":
            raise ValueError(
                f"orientation {self.orientation}: TotalSegmentator's weights are trained in "
                "RAS (its closest-canonical order); leave orientation out or write RAS"
            )
        return self

    @property
    def model_folder(self) -> Path:
        """The nnU-Net trained-model folder (set for TotalSegmentator at validation)."""
        if self.folder is None:
            raise RegistryError(f"model {self.id!r}: no folder resolved")
        return self.folder

    def checkpoint_files(self) -> list[Path]:
        """The checkpoint file of each fold in use, in ``folds`` order (nnU-Net's layout)."""
        return [self.model_folder / f"fold_{fold}" / self.checkpoint for fold in self.folds]

    def resolve_pins(self, base: Path) -> ModelSpec:
        """A copy with ``pins`` keyed by absolute path (``sha256`` keys are below ``base``)."""
        pins = {str((base / rel).resolve()): digest for rel, digest in self.sha256.items()}
        return self.model_copy(update={"pins": pins})

    def pinned_sha256(self, path: Path) -> str | None:
        """The sha256 models.yaml pins for this checkpoint file (None: not pinned)."""
        return self.pins.get(str(Path(path).resolve()))

    def label_ids(self) -> dict[str, int]:
        return {spec.name: value for value, spec in self.labels.items()}

    def segment_labels(self) -> list[SegmentLabel]:
        return [
            SegmentLabel(
                value=value,
                name=spec.name,
                category=spec.category.to_code(),
                type=spec.type.to_code(),
                color_rgb=spec.color,
                laterality=spec.laterality.to_code() if spec.laterality else None,
            )
            for value, spec in sorted(self.labels.items())
        ]


class ModelRegistry:
    """The validated models by id; ``get`` raises ``RegistryError`` naming an unknown id."""

    def __init__(self, models: dict[str, ModelSpec], source: Path) -> None:
        self.models = models
        self.source = source

    def get(self, model_id: str) -> ModelSpec:
        try:
            return self.models[model_id]
        except KeyError:
            raise RegistryError(
                f"model {model_id!r} is not in the registry {self.source}"
            ) from None


def _check_model_folder(spec: ModelSpec) -> None:
    where = f"model {spec.id!r}"
    if spec.folder is None:
        raise RegistryError(f"{where}: no folder given")
    if not spec.folder.is_dir():
        raise RegistryError(f"{where}: folder {spec.folder} does not exist")
    for name in ("dataset.json", "plans.json"):
        if not (spec.folder / name).is_file():
            raise RegistryError(f"{where}: {spec.folder / name} is missing")
    for ckpt in spec.checkpoint_files():
        if not ckpt.is_file():
            raise RegistryError(f"{where}: checkpoint {ckpt} is missing")
    dataset = json.loads((spec.folder / "dataset.json").read_text())
    nn_labels = {int(v): k for k, v in dataset["labels"].items() if int(v) != 0}
    if set(nn_labels) != set(spec.labels):
        raise RegistryError(
            f"{where}: labels {sorted(spec.labels)} do not match dataset.json "
            f"labels {sorted(nn_labels)} in {spec.folder}"
        )
    channels = dataset.get("channel_names") or dataset.get("modality") or {}
    if len(channels) != len(spec.channels):
        raise RegistryError(
            f"{where}: {len(spec.channels)} channels declared ({spec.channels}) but the model "
            f"takes {len(channels)}"
        )
    _check_plans_classes(spec, spec.folder / "plans.json")
    _check_checkpoints(spec, base=spec.folder, require_pins=True)
    expected = len(nn_labels) + 1
    for ckpt in spec.checkpoint_files():
        outputs = checkpoint_outputs(ckpt)
        if outputs is not None and outputs != expected:
            raise RegistryError(
                f"{where}: checkpoint {ckpt} predicts {outputs} classes but dataset.json "
                f"declares {expected} (background included)"
            )


# nnU-Net builds a network by importing and calling the classes plans.json names (the
# architecture and the arguments listed in _kw_requires_import): plans.json is code too.
# Only nnU-Net's own architectures and torch's layers are accepted.
PLANS_CLASS_PREFIXES = ("dynamic_network_architectures.", "torch.nn.")


def _check_plans_classes(spec: ModelSpec, plans_path: Path) -> None:
    """Refuse a plans.json that names a class outside ``PLANS_CLASS_PREFIXES``."""
    try:
        plans = json.loads(plans_path.read_text())
    except (OSError, ValueError) as exc:
        raise RegistryError(f"model {spec.id!r}: {plans_path} cannot be read: {exc}") from None
    for name, config in (plans.get("configurations") or {}).items():
        arch = config.get("architecture") if isinstance(config, dict) else None
        if not isinstance(arch, dict):  # nnU-Net < 2.4 plans name no import path
            continue
        kwargs = arch.get("arch_kwargs") or {}
        named = [arch.get("network_class_name")]
        named += [kwargs.get(key) for key in arch.get("_kw_requires_import") or []]
        for cls in named:
            if cls is not None and not (
                isinstance(cls, str) and cls.startswith(PLANS_CLASS_PREFIXES)
            ):
                raise RegistryError(
                    f"model {spec.id!r}: {plans_path} configuration {name} names {cls!r}, "
                    "which is not one of nnU-Net's architectures or torch's layers (nnU-Net "
                    "imports and calls what plans.json names): refused"
                )


def _check_checkpoints(spec: ModelSpec, base: Path, *, require_pins: bool) -> None:
    """Each checkpoint in use against its sha256 pin (a pin of a file not in use is a
    mistake too); ``require_pins``: an unpinned checkpoint is refused, naming its sha256."""
    where = f"model {spec.id!r}"
    in_use = {str(p.resolve()): p for p in spec.checkpoint_files()}
    stray = [rel for rel in spec.sha256 if str((base / rel).resolve()) not in in_use]
    if stray:
        used = [
            str(p.relative_to(base)) if p.is_relative_to(base) else str(p) for p in in_use.values()
        ]
        raise RegistryError(
            f"{where}: sha256 pins {stray}, which are not checkpoints in use (paths are "
            f"relative to {base}; in use: {used})"
        )
    for ckpt in in_use.values():
        expected = spec.pinned_sha256(ckpt)
        try:
            actual = check_pin(ckpt, expected, where)
        except CheckpointError as exc:
            raise RegistryError(str(exc)) from None
        if expected is None and require_pins:
            rel = ckpt.relative_to(base) if ckpt.is_relative_to(base) else ckpt
            raise RegistryError(
                f"{where}: checkpoint {ckpt} is not pinned: add `sha256: {{{rel}: {actual}}}` "
                "to its entry in models.yaml once you have checked the file against its source"
            )


def checkpoint_outputs(ckpt: Path) -> int | None:
    """Number of classes the checkpoint's segmentation head predicts (None: unknown).

    Read without torch and without running anything in the file
    (``inference.checkpoints.read_checkpoint``): a checkpoint that names any global a
    weights file does not need is refused here, in the node, as well as in the worker.
    """
    try:
        return read_checkpoint(ckpt).segmentation_classes()
    except CheckpointError as exc:
        raise RegistryError(str(exc)) from None


def _check_totalseg(spec: ModelSpec) -> ModelSpec:
    from inference.totalseg_runner import resolve_task_folders, weights_dir

    folders = resolve_task_folders(spec)  # raises RegistryError naming task and folder
    parts = folders if len(folders) > 1 else []
    base = weights_dir()
    spec = spec.model_copy(update={"folder": folders[0], "parts": parts}).resolve_pins(base)
    # TotalSegmentator's weights are the operator's own installation: pins are checked
    # when given (paths relative to the weights directory), not required.
    for folder in folders:
        part = spec.model_copy(update={"folder": folder})
        _check_plans_classes(part, folder / "plans.json")
        _check_checkpoints(part, base, require_pins=False)
        for ckpt in part.checkpoint_files():
            checkpoint_outputs(ckpt)  # refuses a checkpoint that names code to run
    return spec


def load_registry(path: Path | None = None, *, check_folders: bool = True) -> ModelRegistry:
    """Read and validate ``models.yaml`` (default: the repository's).

    With ``check_folders`` every nnU-Net folder is checked (files, labels against
    dataset.json, the checkpoint's number of classes) and TotalSegmentator tasks are
    resolved to their installed weights. Raises ``RegistryError`` naming the model and
    the problem; nothing is ever downloaded.
    """
    path = Path(path or REPO_ROOT / "models.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise RegistryError(f"model registry {path} cannot be read: {exc}") from exc
    models: dict[str, ModelSpec] = {}
    for model_id, body in (raw.get("models") or {}).items():
        if not isinstance(body, dict):
            raise RegistryError(f"model {model_id!r} in {path}: expected a mapping")
        body = {**body, "id": model_id}
        if body.get("folder") and not Path(body["folder"]).is_absolute():
            body["folder"] = str(path.resolve().parent / body["folder"])
        try:
            spec = ModelSpec(**body)
        except ValidationError as exc:
            problems = "; ".join(
                ": ".join(filter(None, (".".join(map(str, e["loc"])), e["msg"])))
                for e in exc.errors()
            )
            raise RegistryError(f"model {model_id!r} in {path}: {problems}") from None
        if spec.kind == "totalsegmentator":
            if not spec.task:
                raise RegistryError(
                    f"model {model_id!r} in {path}: kind totalsegmentator needs a task"
                )
            if check_folders:
                spec = _check_totalseg(spec)
        else:
            if spec.folder is not None:
                spec = spec.resolve_pins(spec.folder)
            if check_folders:
                _check_model_folder(spec)
        models[model_id] = spec
    return ModelRegistry(models, path)
