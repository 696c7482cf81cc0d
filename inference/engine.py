"""Running a pipeline (one or more registered models) on already-loaded volumes.

The engine keeps, between jobs: warm model runners (an LRU over a memory budget), the
volumes of recently used series (so every pipeline of a study reads each series once)
and the label maps of recent model runs (so ``tumor`` reuses the organ model's output
that ``totalseg`` produced for the same series when it crops to the kidneys).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from inference.crop import crop_volume, label_box, paste
from inference.labels import SegmentLabel
from inference.model_cache import ModelCache
from inference.orientation import (
    StackGeometryError,
    plane_spacing_mm,
    reorientation,
    stack_geometry,
)
from inference.postprocess import postprocess
from inference.probability_maps import combine_probabilities, paste_probabilities, write_nifti
from inference.registry import ModelRegistry, ModelSpec
from inference.results import pipeline_version
from inference.volume import Volume, resample_to
from kernel.catalog import PipelineSpec

if TYPE_CHECKING:  # torch only where models run: the node process imports this module
    import torch

    from inference.nnunet_runner import NnUNetRunner
    from inference.totalseg_runner import TotalSegEnsemble

log = logging.getLogger("inference.engine")

DEFAULT_MODEL_BUDGET_MB = 8192
VOLUME_CACHE_ITEMS = 8  # about two 4-phase studies
LABEL_CACHE_ITEMS = 4  # one study's pipelines (uint8 maps, a quarter of a volume each)


class PipelineInputError(ValueError):
    """The inputs do not fit the pipeline (a missing phase, a bad image)."""


@dataclass
class PipelineResult:
    pipeline: str
    reference: Volume
    label_map: np.ndarray  # uint8 [z, y, x] in the reference volume's geometry
    labels: list[SegmentLabel]  # one per label value used in label_map
    model_versions: dict[str, str]
    timings_s: dict[str, float] = field(default_factory=dict)
    mask_path: Path | None = None
    crop_box: tuple[slice, slice, slice] | None = None
    # float16 [1 + labels, z, y, x]: background, then one channel per entry of ``labels``
    # (``PipelineSpec.probabilities``; see inference/probability_maps.py)
    probabilities: np.ndarray | None = None
    probabilities_path: Path | None = None

    @property
    def version(self) -> str:
        return pipeline_version(self.model_versions)


class _Lru:
    """A small thread-safe LRU keyed by string (volumes, label maps)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0

    def get_or_make(self, key: Any, make: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
        value = make()  # outside the lock: a read may take seconds
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class Engine:
    """Warm runners, cached volumes and label maps, and the pipeline logic.

    One per worker child (or process), on one ``torch.device``. ``run(name, spec,
    inputs)`` takes volumes by input role and returns a ``PipelineResult`` whose uint8
    label map [z, y, x] lies in the reference volume's geometry; it raises
    ``PipelineInputError`` when the inputs do not fit the pipeline.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        device: torch.device,
        *,
        model_budget_mb: int = DEFAULT_MODEL_BUDGET_MB,
        volume_cache_items: int = VOLUME_CACHE_ITEMS,
    ) -> None:
        self.registry = registry
        self.device = device
        self.models = ModelCache(model_budget_mb)
        self.volumes = _Lru(volume_cache_items)
        self._label_maps = _Lru(LABEL_CACHE_ITEMS)

    def runner(self, model_id: str) -> NnUNetRunner | TotalSegEnsemble:
        """The warm runner of a model, loaded on first use."""
        spec = self.registry.get(model_id)
        return self.models.get(  # type: ignore[return-value]
            model_id, spec.memory_mb, lambda: _make_runner(spec, self.device)
        )

    def volume(self, key: str, load: Callable[[], Volume]) -> Volume:
        """A series read once and shared by every job and pipeline of this worker.

        ``key`` identifies the content (series UID + instance count, or a file path + mtime).
        """
        return self.volumes.get_or_make(key, load)

    # --- models ---------------------------------------------------------------------

    def predict(
        self,
        model_id: str,
        inputs: dict[str, Volume],
        box: Any = None,
        *,
        with_probabilities: bool = False,
    ) -> Any:
        """One model's label map (its own label ids) in the reference input's geometry.

        With ``with_probabilities`` (nnU-Net models only): ``(label_map, probabilities)``,
        the class probabilities float16 [classes, z, y, x] (background first) on the same
        voxels; outside a ``box`` the background has probability 1.

        Returns uint8 [z, y, x] in the reference volume's own array order (``array[z]`` is
        ``headers[z]``: the DICOM-SEG frames follow it), whatever order the model runs in.
        Every input is first put on the grid its slice headers describe (a gantry-tilted
        stack is sheared: ``stack_geometry``); secondary inputs are resampled into the
        reference (channel 0) grid; with ``box`` the model sees only that crop of the
        reference and the result is pasted back. The model sees the channels in the voxel
        order it was trained in (``ModelSpec.orientation``: ``LPS`` for the stand-ins,
        ``RAS`` for TotalSegmentator), so a prone, feet-first, decubitus or flipped series
        looks to it like the head-first supine series it learnt on, with the spacing
        between image planes along their normal.

        Raises ``PipelineInputError`` when an input is missing or its slices do not form
        one regular grid (the message names the model and the series).
        """
        spec = self.registry.get(model_id)
        missing = [c for c in spec.channels if c not in inputs]
        if missing:
            raise PipelineInputError(
                f"model {model_id} needs inputs {missing}, got {sorted(inputs)}"
            )
        try:
            placed = {c: stack_geometry(inputs[c]) for c in spec.channels}
        except StackGeometryError as exc:
            raise PipelineInputError(f"model {model_id}: {exc}") from exc
        full_ref = placed[spec.channels[0]]
        ref = crop_volume(full_ref, box) if box is not None else full_ref
        channels = np.stack(
            [
                ref.array if c == spec.channels[0] else resample_to(placed[c], ref)
                for c in spec.channels
            ]
        )
        turn = reorientation(ref.direction, spec.orientation)
        spacing_zyx = (plane_spacing_mm(ref), *ref.spacing_zyx[1:])
        if with_probabilities:
            if spec.kind != "nnunet":
                raise PipelineInputError(
                    f"model {model_id} ({spec.kind}) gives no class probabilities"
                )
            seg, probabilities = self.runner(model_id).predict(
                turn.to_canonical(channels), turn.spacing(spacing_zyx), with_probabilities=True
            )
            seg, probabilities = turn.from_canonical(seg), turn.from_canonical(probabilities)
            if box is None:
                return seg, probabilities
            return paste(seg, box, full_ref.shape), paste_probabilities(
                probabilities, box, full_ref.shape
            )
        seg = self.runner(model_id).predict(turn.to_canonical(channels), turn.spacing(spacing_zyx))
        seg = turn.from_canonical(seg)
        if spec.kind == "totalsegmentator":
            seg = _keep_only(seg, _totalseg_keep(spec))
        return paste(seg, box, full_ref.shape) if box is not None else seg

    def predict_cached(self, model_id: str, inputs: dict[str, Volume]) -> np.ndarray:
        """``predict`` on full volumes, remembered per model and input content."""
        spec = self.registry.get(model_id)
        key = (model_id, spec.version, tuple(_content_key(inputs[c]) for c in spec.channels))
        return self._label_maps.get_or_make(key, lambda: self.predict(model_id, inputs))

    # --- pipelines ------------------------------------------------------------------

    def run(
        self,
        name: str,
        spec: PipelineSpec,
        inputs: dict[str, Volume],
        *,
        mask_dir: Path | None = None,
    ) -> PipelineResult:
        """Run the pipeline's models, combine their labels into one map and clean it up."""
        models = [self.registry.get(m) for m in spec.models]
        reference = _reference(name, models, inputs)
        timings: dict[str, float] = {}
        box = None
        crop = getattr(spec, "crop", None)
        if crop is not None:
            started = time.perf_counter()
            box = self.crop_box(name, crop, inputs, reference)
            timings[f"crop:{crop.to_model}"] = round(time.perf_counter() - started, 3)
        combined = np.zeros(reference.shape, np.uint8)
        labels: list[SegmentLabel] = []
        versions: dict[str, str] = {}
        want_probabilities = bool(getattr(spec, "probabilities", None))
        probability_maps: list[np.ndarray] = []  # per model [classes, z, y, x]
        for model in models:
            started = time.perf_counter()
            # Full-volume label maps are remembered: a crop model's organs (totalseg's
            # kidneys for tumor) and a pipeline running that model share one prediction.
            if want_probabilities:
                seg, probabilities = self.predict(
                    model.id, inputs, box, with_probabilities=True
                )
                probability_maps.append(probabilities)
            elif box is None:
                seg = self.predict_cached(model.id, inputs)
            else:
                seg = self.predict(model.id, inputs, box)
            seg = postprocess(
                seg, {v: lab.postprocess for v, lab in model.labels.items()}, reference.spacing_zyx
            )
            timings[model.id] = round(time.perf_counter() - started, 3)
            versions[model.id] = model.version
            # Renumber this model's labels after the ones already collected.
            for label in model.segment_labels():
                new_value = len(labels) + 1
                combined[seg == label.value] = new_value
                labels.append(
                    SegmentLabel(
                        value=new_value,
                        name=label.name,
                        category=label.category,
                        type=label.type,
                        color_rgb=label.color_rgb,
                        laterality=label.laterality,
                    )
                )
        result = PipelineResult(name, reference, combined, labels, versions, timings, crop_box=box)
        if probability_maps:
            result.probabilities = combine_probabilities(probability_maps, models)
        if mask_dir is not None and getattr(spec, "masks", None) == "nifti":
            from inference.nifti_io import write_mask

            result.mask_path = write_mask(reference, combined, Path(mask_dir) / f"{name}.nii.gz")
        keep = "nifti" in getattr(spec, "probabilities", [])
        if mask_dir is not None and result.probabilities is not None and keep:
            result.probabilities_path = write_nifti(
                reference, result.probabilities, Path(mask_dir) / f"{name}_probabilities.nii.gz"
            )
        log.info("pipeline %s ran on %s: %s", name, reference.series_uid, timings)
        return result

    def crop_box(self, name: str, crop: Any, inputs: dict[str, Volume], reference: Volume) -> Any:
        """Pipeline ``name``'s box on ``reference``: the crop model's labels (its cached
        full-volume prediction) plus the margin; None when it finds none of them."""
        organ = self.registry.get(crop.to_model)
        if inputs.get(organ.channels[0]) is not reference:
            # The organ model reads the pipeline's reference role under its own name.
            inputs = {**inputs, organ.channels[0]: reference}
        organ_map = self.predict_cached(organ.id, inputs)
        ids = organ.label_ids()
        unknown = [n for n in crop.labels if n not in ids]
        if unknown:
            raise PipelineInputError(
                f"pipeline {name}: crop labels {unknown} are not outputs of model {organ.id}"
            )
        box = label_box(
            organ_map, [ids[n] for n in crop.labels], reference.spacing_zyx, crop.margin_mm
        )
        if box is None:
            log.warning("pipeline %s: no %s found, running on the full volume", name, crop.labels)
        return box


def _reference(name: str, models: list[ModelSpec], inputs: dict[str, Volume]) -> Volume:
    """The one volume whose geometry every model's output is in (channel 0 of each)."""
    refs = []
    for model in models:
        missing = [c for c in model.channels if c not in inputs]
        if missing:
            raise PipelineInputError(
                f"pipeline {name}: model {model.id} needs inputs {missing}, got {sorted(inputs)}"
            )
        refs.append(inputs[model.channels[0]])
    if any(r is not refs[0] for r in refs):
        raise PipelineInputError(f"pipeline {name}: all models must share the reference input")
    return refs[0]


def _content_key(volume: Volume) -> str:
    """What identifies a volume's content: its voxels and grid, not its name."""
    return volume.digest


def _totalseg_keep(spec: ModelSpec) -> list[int]:
    keep = set(spec.labels)
    if spec.roi_subset:
        ids = spec.label_ids()
        keep &= {ids[n] for n in spec.roi_subset if n in ids}
    return sorted(keep)


def _keep_only(seg: np.ndarray, values: list[int]) -> np.ndarray:
    lut = np.zeros(max(256, int(seg.max()) + 1), seg.dtype)
    lut[values] = values
    return lut[seg]


def _make_runner(spec: ModelSpec, device: torch.device) -> NnUNetRunner | TotalSegEnsemble:
    """A warm runner: one nnU-Net predictor, or TotalSegmentator's ensemble of parts."""
    if spec.parts:
        from inference.totalseg_runner import TotalSegEnsemble

        return TotalSegEnsemble(spec, device)
    from inference.nnunet_runner import NnUNetRunner

    return NnUNetRunner(spec, device)
