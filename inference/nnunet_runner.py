"""A warm nnU-Net v2 predictor for one registered model.

Initialised once (network + weights on the device) and called per job with an
in-memory array through ``predict_single_npy_array``: no files, no process pools.

The weights are loaded here, not by nnU-Net's ``initialize_from_trained_model_folder``
(which calls ``torch.load(weights_only=False)`` and so runs whatever a checkpoint names):
each fold's file is read once, checked against its sha256 pin and loaded with
``weights_only=True`` (``inference.checkpoints.load_checkpoint``); the network is then
built from plans.json by the trainer class the checkpoint names, as nnU-Net builds it.
This module imports torch: only worker processes import it (never the node process).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import threading
import time
import warnings
from typing import Any

import numpy as np
import torch

from inference.checkpoints import CheckpointError, load_checkpoint
from inference.registry import ModelSpec

log = logging.getLogger("inference.nnunet")


def resolve_device(name: str) -> torch.device:
    """'auto' picks the first CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name} configured but CUDA is not available")
    return device


class NnUNetRunner:
    """One warm predictor; ``predict`` is called per job with arrays in memory."""

    def __init__(self, spec: ModelSpec, device: torch.device) -> None:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        started = time.perf_counter()
        self.spec = spec
        self.device = device
        # nnU-Net prints a notice on every CPU construction; keep stdout for our output.
        with contextlib.redirect_stdout(io.StringIO()):
            self.predictor = nnUNetPredictor(
                tile_step_size=spec.tile_step_size,
                use_gaussian=True,
                use_mirroring=spec.use_mirroring,
                perform_everything_on_device=device.type == "cuda",
                device=device,
                verbose=False,
                verbose_preprocessing=False,
                allow_tqdm=False,
            )
        initialize_safely(self.predictor, spec)
        if device.type == "cpu" and _is_3d(self.predictor.network):
            # oneDNN's 3D convolutions run ~1.8x faster in channels-last layout on a CPU;
            # the weights nnU-Net loads per fold are copied into this layout, and the
            # logits differ from the default layout only by float rounding (~1e-6).
            self.predictor.network.to(memory_format=torch.channels_last_3d)
        # predict_single_npy_array is not re-entrant (shared network state).
        self._lock = threading.Lock()
        log.info(
            "model %s %s loaded on %s in %.2f s",
            spec.id,
            spec.version,
            device,
            time.perf_counter() - started,
        )

    def predict(
        self,
        channels: np.ndarray,
        spacing_zyx: tuple[float, float, float],
        *,
        with_probabilities: bool = False,
    ) -> Any:
        """Label map [z, y, x] (uint8) for input channels [c, z, y, x] in HU.

        With ``with_probabilities``: ``(label_map, probabilities)``, the class
        probabilities float16 [classes, z, y, x] (background first) on the same grid; the
        label map is their argmax, except that with ``min_confidence`` voxels whose winning
        probability is lower are background.
        """
        if channels.ndim != 4 or channels.shape[0] != len(self.spec.channels):
            raise ValueError(
                f"model {self.spec.id} takes {len(self.spec.channels)} channels "
                f"[c, z, y, x], got shape {channels.shape}"
            )
        want_probabilities = with_probabilities or self.spec.min_confidence is not None
        with self._lock, torch.inference_mode():
            out = self.predictor.predict_single_npy_array(
                channels.astype(np.float32, copy=False),
                {"spacing": [float(s) for s in spacing_zyx]},
                None,
                None,
                want_probabilities,
            )
        if not want_probabilities:
            return np.asarray(out, dtype=np.uint8)
        seg, probabilities = out
        seg = np.asarray(seg, dtype=np.uint8)
        if self.spec.min_confidence is not None:
            # Uncertain voxels become background: a low-confidence call is worse than none.
            seg[np.max(probabilities, axis=0) < self.spec.min_confidence] = 0
        if with_probabilities:
            return seg, np.asarray(probabilities, dtype=np.float16)
        return seg

    def close(self) -> None:
        """Drop the network so its memory can be reused (LRU eviction)."""
        self.predictor.network = None
        self.predictor.list_of_parameters = []
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _is_3d(network: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Conv3d) for m in network.modules())


def _trainer_class(trainer_name: str) -> type:
    """The nnU-Net trainer class a checkpoint names (it builds the network)."""
    try:  # nnU-Net >= 2.6
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

        found = recursive_find_trainer_class_by_name(trainer_name)
    except ImportError:
        from os.path import join

        import nnunetv2
        from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

        found = recursive_find_python_class(
            join(nnunetv2.__path__[0], "training", "nnUNetTrainer"),
            trainer_name,
            "nnunetv2.training.nnUNetTrainer",
        )
    except RuntimeError:  # nnU-Net raises when no trainer has the name
        found = None
    if found is None:
        raise CheckpointError(f"trainer {trainer_name!r} is not an installed nnU-Net trainer")
    return found


def initialize_safely(predictor: object, spec: ModelSpec) -> None:
    """Set up ``predictor`` (an ``nnUNetPredictor``) with the model's network and the
    weights of each fold, as ``initialize_from_trained_model_folder`` does, but loading
    every checkpoint with ``weights_only=True`` after checking its sha256 pin.

    Raises ``CheckpointError`` naming the model and the file (changed file, unpinned
    nnunet checkpoint, a checkpoint naming code, an unknown trainer).
    """
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    where = f"model {spec.id!r}"
    folder = spec.model_folder
    dataset_json = json.loads((folder / "dataset.json").read_text())
    plans_manager = PlansManager(json.loads((folder / "plans.json").read_text()))
    parameters = []
    for i, path in enumerate(spec.checkpoint_files()):
        expected = spec.pinned_sha256(path)
        if expected is None and spec.kind == "nnunet":
            raise CheckpointError(f"{where}: checkpoint {path} has no sha256 pin in models.yaml")
        checkpoint = load_checkpoint(path, expected, where)
        if i == 0:
            trainer_name = str(checkpoint["trainer_name"])
            configuration_name = str(checkpoint["init_args"]["configuration"])
            mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes")
        parameters.append(checkpoint["network_weights"])
    configuration_manager = plans_manager.get_configuration(configuration_name)
    num_input_channels = determine_num_input_channels(
        plans_manager, configuration_manager, dataset_json
    )
    num_output_channels = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    try:
        trainer_class = _trainer_class(trainer_name)
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc} ({spec.checkpoint_files()[0]})") from None
    build = trainer_class.build_network_architecture
    if "plans_manager" in inspect.signature(build).parameters:
        network = build(
            plans_manager,
            configuration_manager,
            num_input_channels,
            num_output_channels,
            enable_deep_supervision=False,
        )
    else:  # the signature of nnU-Net < 2.6
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            network = build(
                configuration_manager.network_arch_class_name,
                configuration_manager.network_arch_init_kwargs,
                configuration_manager.network_arch_init_kwargs_req_import,
                num_input_channels,
                num_output_channels,
                enable_deep_supervision=False,
            )
    network.load_state_dict(parameters[0])
    predictor.manual_initialization(  # type: ignore[attr-defined]
        network,
        plans_manager,
        configuration_manager,
        parameters,
        dataset_json,
        trainer_name,
        mirroring_axes,
    )
