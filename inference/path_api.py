"""Jobs whose inputs are file paths (the seed service's HTTP API), through the job queue.

A path job stores ``job.inputs = {role: {"path": "/data/ct.nii.gz"}}``; a DICOM job stores
``{role: "<series uid>"}``. ``load_input`` reads either into a Volume (once: through the
engine's volume cache), and ``run_path_job`` runs the pipeline and writes the NIfTI mask
instead of a DICOM-SEG. The worker calls ``run_path_job`` for jobs ``is_path_job`` accepts.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from inference.engine import Engine, PipelineInputError
from inference.nifti_io import is_nifti, read_nifti, write_mask
from inference.volume import SeriesReadError, Volume, load_series
from kernel.catalog import PipelineSpec

log = logging.getLogger(__name__)


class PathInputError(ValueError):
    """A path input is missing, not an image, or does not fit the pipeline (-> HTTP 4xx)."""


class PathNotAllowedError(PathInputError):
    """A path outside the folders the path API may read (-> HTTP 403). Said the same way
    whether or not the path exists, so the API tells nothing about the rest of the disk."""


def is_path_job(inputs: dict[str, Any]) -> bool:
    return any(isinstance(v, dict) and "path" in v for v in inputs.values())


def _under(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def within_roots(role: str, raw: str, roots: Sequence[Path]) -> Path:
    """``raw`` (absolute) with every symbolic link resolved, when it lies under one of
    ``roots`` both as written (``..`` folded) and resolved; raises
    ``PathNotAllowedError`` otherwise, before anything about the path itself is looked
    at, so a path outside answers the same whether it exists or not."""
    refused = PathNotAllowedError(
        f"input {role}: {raw} is not under a folder the path API may read "
        "(data_dir and path_api.allowed_roots)"
    )
    written = Path(os.path.normpath(raw))
    resolved_roots = [Path(os.path.realpath(r)) for r in roots]
    as_written = [Path(os.path.normpath(r)) for r in roots] + resolved_roots
    if not any(_under(written, r) for r in as_written):
        raise refused
    resolved = Path(os.path.realpath(written))  # a link inside may point outside
    if not any(_under(resolved, r) for r in resolved_roots):
        raise refused
    return resolved


def check_path(role: str, raw: object, roots: Sequence[Path] | None = None) -> Path:
    """The input path of one role, checked to lie under ``roots`` (None: anywhere; the
    web API always gives them), to exist and be a NIfTI file or a folder. Returns the
    path with symbolic links resolved."""
    if not isinstance(raw, str) or not raw.strip():
        raise PathInputError(f"input {role}: a path string is required")
    if "\x00" in raw or len(raw) > 4096:
        raise PathInputError(f"input {role}: not a usable path")
    path = Path(raw)
    if not path.is_absolute():
        raise PathInputError(f"input {role}: {raw!r} must be an absolute path")
    if roots is not None:
        path = within_roots(role, raw, roots)
    if not path.exists():
        raise PathInputError(f"input {role}: {path} does not exist")
    if path.is_file() and not is_nifti(path):
        raise PathInputError(f"input {role}: {path} is neither a NIfTI file nor a DICOM folder")
    return path


# What a path input may be, said in every refusal of one that cannot be read.
ACCEPTED = "accepted: a NIfTI file (.nii or .nii.gz) or a folder holding one DICOM series"


def _is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file: the 128-byte preamble and then ``DICM`` (PS3.10 7.1)."""
    with path.open("rb") as f:
        return f.read(132)[128:] == b"DICM"


def _read_path(path: Path) -> Volume:
    """The image at ``path``: a NIfTI file, or a folder of DICOM files of one series.

    Raises ``PathInputError`` naming the file that is no image and what is accepted; the
    reader's own words (SimpleITK's, with its source file and line) go to the log only.
    """
    if path.is_file():
        try:
            return read_nifti(path)
        except SeriesReadError as exc:
            log.warning("path input %s: %s", path, exc)
            if exc.__cause__ is None:  # read, but not one 3D greyscale image
                raise PathInputError(f"{exc}; {ACCEPTED}") from exc
            raise PathInputError(
                f"{path} cannot be read as an image: it is not a NIfTI file; {ACCEPTED}"
            ) from exc
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise PathInputError(f"{path} holds no files; {ACCEPTED}")
    others = [f for f in files if not _is_dicom_file(f)]
    if others:
        more = f" (and {len(others) - 1} more of its {len(files)} files)" if len(others) > 1 else ""
        raise PathInputError(
            f"{others[0]} cannot be read as an image: it is not a DICOM file{more}; {ACCEPTED}"
        )
    try:
        return load_series(files)
    except SeriesReadError as exc:  # DICOM files, but no one 3D image: the reason names them
        raise PathInputError(f"{path} cannot be read as one 3D image: {exc}") from exc


def load_input(
    value: str | dict[str, Any],
    *,
    engine: Engine | None = None,
    series_files: Callable[[str], list[str]] | None = None,
) -> Volume:
    """One job input as a Volume: ``{"path": ...}`` or a series UID (needs ``series_files``).

    With an engine, the volume comes from (and goes into) its cache, so every pipeline of
    the study reads each series once.
    """
    if isinstance(value, dict):
        path = check_path("image", value.get("path"))
        stat = path.stat()
        key = f"path:{path}:{stat.st_mtime_ns}:{stat.st_size}"

        def load() -> Volume:
            return _read_path(path)

    else:
        if series_files is None:
            raise ValueError("a series UID input needs series_files")
        files = series_files(value)
        key = f"series:{value}:{len(files)}"

        def load() -> Volume:
            return load_series(files, series_uid=value)

    return engine.volume(key, load) if engine is not None else load()


def path_inputs(
    spec: PipelineSpec, body: dict[str, Any], roots: Sequence[Path] | None = None
) -> dict[str, dict[str, str]]:
    """Request fields -> job inputs: ``image_path`` for a one-input pipeline, else
    ``image_<ROLE>_path`` per role (``image_A_path``, ``image_P_path``, ``image_D_path``).

    A one-input pipeline also accepts ``image_<ROLE>_path`` (the ureter's ``image_D_path``).
    With ``roots`` every path must lie under one of them (``PathNotAllowedError``); the
    job gets the paths with symbolic links resolved.
    """
    roles = list(spec.inputs)
    inputs: dict[str, dict[str, str]] = {}
    for role in roles:
        raw = body.get(f"image_{role}_path")
        if raw is None and len(roles) == 1:
            raw = body.get("image_path")
        if raw is None:
            wanted = "image_path" if len(roles) == 1 else f"image_{role}_path"
            raise PathInputError(
                f"this pipeline takes {len(roles)} image(s) ({', '.join(roles)}): "
                f"{wanted} is missing"
            )
        inputs[role] = {"path": str(check_path(role, raw, roots))}
    extra = [k for k in body if k.endswith("_path") and k != "image_path" and k[6:-5] not in roles]
    if extra:
        raise PathInputError(f"unexpected inputs {extra}: this pipeline reads {roles}")
    return inputs


def run_path_job(
    engine: Engine,
    pipeline: str,
    spec: PipelineSpec,
    inputs: dict[str, Any],
    mask_dir: Path,
) -> dict[str, Any]:
    """Run a path job and write its mask; the summary holds ``mask_path`` for the API."""
    started = time.perf_counter()
    volumes = {role: load_input(v, engine=engine) for role, v in inputs.items()}
    loaded = time.perf_counter()
    try:
        result = engine.run(pipeline, spec, volumes)
    except PipelineInputError as exc:
        raise PathInputError(str(exc)) from exc
    path = write_mask(result.reference, result.label_map, Path(mask_dir) / f"{pipeline}.nii.gz")
    extra: dict[str, Any] = {}
    if result.probabilities is not None and "nifti" in spec.probabilities:
        from inference.probability_maps import write_nifti

        target = Path(mask_dir) / f"{pipeline}_probabilities.nii.gz"
        written = write_nifti(result.reference, result.probabilities, target)
        extra["probabilities_path"] = str(written)
    return {
        **extra,
        "mask_path": str(path),
        "labels": {lab.name: lab.value for lab in result.labels},
        "model_versions": result.model_versions,
        "seconds": {
            "load": round(loaded - started, 3),
            "inference": round(time.perf_counter() - loaded, 3),
        },
    }
