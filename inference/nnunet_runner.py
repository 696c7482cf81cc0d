"""A warm nnU-Net v2 predictor for one registered model.

Initialised once (network + weights on the device) and called per job with an
in-memory array through ``predict_single_npy_array``: no files, no process pools.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import time

import numpy as np
import torch

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
        self.predictor.initialize_from_trained_model_folder(
            str(spec.model_folder), use_folds=tuple(spec.folds), checkpoint_name=spec.checkpoint
        )
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

    def predict(self, channels: np.ndarray, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
        """Label map [z, y, x] (uint8) for input channels [c, z, y, x] in HU."""
        if channels.ndim != 4 or channels.shape[0] != len(self.spec.channels):
            raise ValueError(
                f"model {self.spec.id} takes {len(self.spec.channels)} channels "
                f"[c, z, y, x], got shape {channels.shape}"
            )
        want_probabilities = self.spec.min_confidence is not None
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
        # Uncertain voxels become background: a low-confidence call is worse than none.
        seg[np.max(probabilities, axis=0) < self.spec.min_confidence] = 0
        return seg

    def close(self) -> None:
        """Drop the network so its memory can be reused (LRU eviction)."""
        self.predictor.network = None
        self.predictor.list_of_parameters = []
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _is_3d(network: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Conv3d) for m in network.modules())
