"""Model checkpoint files: pinned by sha256 and read without running code they carry.

A PyTorch checkpoint is a zip archive whose ``data.pkl`` is a pickle, and unpickling calls
whatever functions the file names: a checkpoint is code. ``torch.load(weights_only=False)``
runs it, so a file planted in a model folder would run in every process that loads it.
Three defences, each on its own:

- Pin: ``models.yaml`` gives each checkpoint's sha256; a file that differs is refused,
  naming the model and the file (``check_pin``), before anything reads it.
- The node process (receive, route, send, web) never imports torch. It reads the pickle
  with a restricted unpickler (``read_checkpoint``) that knows only the data-only globals
  a weights file needs (tensors, storages, ``OrderedDict``, ``torch.device``, NumPy
  scalars and arrays in nnU-Net's training log), maps them to inert stand-ins, never
  reads tensor data, and refuses any other global by name without calling it. That is
  enough to read the class count of the segmentation head.
- The worker (``load_checkpoint``) loads the bytes it has just hashed, after the same
  scan, with ``torch.load(weights_only=True)``; the NumPy globals of nnU-Net's training
  log (``NUMPY_GLOBALS``) are the only globals allowed beyond torch's own.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import hashlib
import io
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

# The NumPy objects nnU-Net's checkpoints hold (its training log and best EMA Dice are
# NumPy float64 scalars and lists of them), under NumPy 2's and NumPy 1's module names.
NUMPY_GLOBALS = (
    "numpy._core.multiarray.scalar",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
)
_NUMPY_DTYPE_CLASS = re.compile(r"^numpy\.dtypes\.\w+DType$")

# torch's typed storages as torch.save names them (storage type of each tensor).
_STORAGES = {
    f"torch.{kind}Storage"
    for kind in (
        "Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte",
        "Bool", "ComplexFloat", "ComplexDouble",
    )
} | {"torch.storage.UntypedStorage", "torch.UntypedStorage"}  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint is refused or unreadable; the message names the file and the reason."""


@dataclass(frozen=True)
class TensorShape:
    """A tensor of the checkpoint, as far as the node needs it: its shape."""

    shape: tuple[int, ...]


@dataclass
class CheckpointInfo:
    """What the torch-free reader found: top-level keys and the weights' shapes."""

    path: Path
    keys: list[str]
    trainer_name: str | None = None
    weight_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def segmentation_classes(self) -> int | None:
        """Classes (background included) the last segmentation head predicts; None when the
        network has no ``seg_layers`` (not an nnU-Net U-Net) and the count is unknown."""
        heads = [
            shape
            for name, shape in self.weight_shapes.items()
            if "seg_layers" in name and name.endswith("weight") and shape
        ]
        return int(heads[-1][0]) if heads else None


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def check_pin(path: Path, expected: str | None, where: str, actual: str | None = None) -> str:
    """The file's sha256, checked against ``expected`` (None: not pinned, not checked).

    Raises ``CheckpointError`` naming ``where`` (the model) and the file when they differ.
    """
    actual = actual or sha256_file(path)
    if expected is not None and actual != expected:
        raise CheckpointError(
            f"{where}: checkpoint {path} has changed: its sha256 is {actual}, models.yaml "
            f"pins {expected}. Refusing to load it; if the new file is the model you meant "
            "to install, check it against its source and update the pin"
        )
    return actual


class _Inert:
    """Stands in for every allowed non-tensor object: takes any arguments and state."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.args = args

    def __setstate__(self, state: object) -> None:
        self.state = state


class _Storage:
    """A tensor storage named by the archive; its bytes are never read."""


def _rebuild_tensor(storage: object, offset: int, size: tuple[int, ...], *rest: object) -> Any:
    return TensorShape(tuple(int(n) for n in size))


def _rebuild_parameter(data: object, *rest: object) -> object:
    return data


def _safe_global(name: str) -> object | None:
    """The inert stand-in for an allowed global, or None when it is not allowed."""
    if name == "collections.OrderedDict":
        return collections.OrderedDict
    if name == "_codecs.encode":  # how pickle protocol 2 writes bytes (NumPy scalars)
        return codecs.encode
    if name in ("builtins.set", "builtins.frozenset", "builtins.bytearray", "builtins.complex"):
        return {"set": set, "frozenset": frozenset, "bytearray": bytearray, "complex": complex}[
            name.split(".", 1)[1]
        ]
    if name == "torch._utils._rebuild_tensor_v2":
        return _rebuild_tensor
    if name in ("torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state"):
        return _rebuild_parameter
    if name in _STORAGES:
        return _Storage
    if name in ("torch.device", "torch.Size") or name in NUMPY_GLOBALS:
        return _Inert
    if _NUMPY_DTYPE_CLASS.match(name):
        return _Inert
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 2 (torch.save's) writes Python 2 names (__builtin__.set): read them as
        # the default find_class does.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = _safe_global(f"{module}.{name}")
        if found is None:
            raise CheckpointError(
                f"checkpoint {self.path} refers to {module}.{name}, which a weights file "
                "never needs: refused without running it (code planted in the file, or "
                "objects of a training script saved with the weights)"
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and pid and pid[0] == "storage":
            return _Storage()
        raise CheckpointError(f"checkpoint {self.path}: unknown persistent id {pid!r}")


def _pickle_bytes(data: bytes, path: Path) -> bytes:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise CheckpointError(
            f"checkpoint {path} is not a PyTorch zip checkpoint (torch.save since 1.6); "
            "re-save it with a current torch"
        ) from None
    names = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(names) != 1:
        raise CheckpointError(f"checkpoint {path}: expected one data.pkl, found {names}")
    return archive.read(names[0])


def scan_checkpoint(data: bytes, path: Path) -> CheckpointInfo:
    """Read a checkpoint's structure from its bytes without torch and without running any
    of it; raises ``CheckpointError`` naming the file and the refused global."""
    try:
        top = _RestrictedUnpickler(_pickle_bytes(data, path), path).load()
    except CheckpointError:
        raise
    except Exception as exc:  # truncated or foreign bytes
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from exc
    if not isinstance(top, dict):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(top).__name__}, not a dict of weights"
        )
    info = CheckpointInfo(path=path, keys=[str(k) for k in top])
    trainer = top.get("trainer_name")
    info.trainer_name = trainer if isinstance(trainer, str) else None
    weights = top.get("network_weights")
    if isinstance(weights, dict):
        info.weight_shapes = {
            str(k): v.shape for k, v in weights.items() if isinstance(v, TensorShape)
        }
    return info


def read_checkpoint(path: Path) -> CheckpointInfo:
    """``scan_checkpoint`` of a file (the node's check at start: no torch)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from exc
    return scan_checkpoint(data, Path(path))


def _numpy_safe_globals() -> list[tuple[object, str]]:
    import numpy as np

    try:
        multiarray = np._core.multiarray
    except AttributeError:  # NumPy 1.x
        multiarray = np.core.multiarray
    found: list[tuple[object, str]] = [
        (multiarray.scalar, "numpy._core.multiarray.scalar"),
        (multiarray.scalar, "numpy.core.multiarray.scalar"),
        (multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
        (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
        (np.ndarray, "numpy.ndarray"),
        (np.dtype, "numpy.dtype"),
    ]
    dtypes = getattr(np, "dtypes", None)
    for name in dir(dtypes) if dtypes is not None else []:
        if name.endswith("DType"):
            found.append((getattr(dtypes, name), f"numpy.dtypes.{name}"))
    return found


def load_checkpoint(path: Path, expected_sha256: str | None, where: str) -> dict[str, Any]:
    """A checkpoint's contents for the worker: the file is read once, its bytes hashed and
    checked against the pin, scanned as in the node, then loaded by
    ``torch.load(weights_only=True)`` on the CPU with only ``NUMPY_GLOBALS`` allowed
    beyond torch's defaults. Raises ``CheckpointError`` naming ``where`` and the file."""
    import torch

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{where}: checkpoint {path} cannot be read: {exc}") from exc
    check_pin(path, expected_sha256, where, actual=hashlib.sha256(data).hexdigest())
    try:
        scan_checkpoint(data, path)
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError for a refused global, and the like
        raise CheckpointError(f"{where}: checkpoint {path} refused by torch: {exc}") from exc
    if not isinstance(loaded, dict) or "network_weights" not in loaded:
        raise CheckpointError(f"{where}: checkpoint {path} has no network_weights")
    return loaded
