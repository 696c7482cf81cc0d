"""The pipeline catalog: which models a pipeline runs, on which inputs, with what output.

The catalog is the ``pipelines:`` section of the rules file (``routing_rules.yaml``).
Routing reads it to know what a pipeline needs before it queues a job; every worker reads
it to know what a queued job means. Workers never parse the routing rules themselves:
``load_catalog`` reads only this section, so a worker depends on the pipelines, not on
the conditions that route series to them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator

from kernel.strict import StrictModel
from kernel.vocabulary import Priority
from kernel.webhooks import check_url

log = logging.getLogger("dicom_node.catalog")

PhaseCode = Literal["A", "P", "D", "N"]


class CatalogError(ValueError):
    """The pipeline catalog is invalid; the message names the pipeline and the reason."""


class CropSpec(StrictModel):
    """Run a pipeline's models only inside another model's labels (plus a margin).

    ``to_model``'s full-volume output on the reference input is reused when a pipeline
    running that model already made it for the same series.
    """

    to_model: str = Field(description="A model of the registry that finds the organs.")
    labels: list[str] = Field(min_length=1, description="That model's label names to crop to.")
    margin_mm: float = Field(20.0, ge=0, description="Margin around the labels, in mm.")


class PipelineSpec(StrictModel):
    """One pipeline: models run on a study's series, combined into one label map.

    ``inputs`` maps an input role (``image``, or a phase such as ``A`` / ``P``) to the
    phases that may feed it, most preferred first. A pipeline fires as soon as every role
    has a complete series of its first phase; with only fallback phases it waits until the
    study settled (``study_timeout_s``). The first model's first channel is the reference:
    the result lies in that series' geometry.
    """

    models: list[str] = Field(min_length=1, description="Model ids from the model registry.")
    crop: CropSpec | None = None
    masks: Literal["nifti"] | None = Field(
        None, description="Also write a NIfTI label map per study (results/<study>/masks)."
    )
    description: str = ""
    priority: Priority = Priority.NORMAL
    inputs: dict[str, list[PhaseCode]] = Field(
        default_factory=lambda: {"image": ["P", "A", "D"]}, min_length=1
    )
    probabilities: list[Literal["nifti", "fractional_seg"]] = Field(
        default_factory=list,
        description="Also keep the models' class probabilities: 'nifti' writes a 4D NIfTI "
        "(background, then each label) beside the masks, 'fractional_seg' sends a "
        "FRACTIONAL DICOM-SEG to the destinations that take SEG (nnU-Net models only; see "
        "inference/probability_maps.py for the threshold the label map uses).",
    )
    review: Literal["none", "required"] = Field(
        "none",
        description="'required': every result of this pipeline is held until a reviewer "
        "approves it (then sent) or rejects it (never sent): shadow mode for a new model.",
    )
    update_url: str | None = Field(
        None,
        description="An http:// or https:// URL the node POSTs each job's status to when "
        "it ends (done, failed, cancelled, expired): signed, retried (kernel.webhooks).",
    )

    @field_validator("update_url")
    @classmethod
    def _http_url(cls, v: str | None, info: ValidationInfo) -> str | None:
        """An http(s) URL; its host checked against ``webhooks.allowed_hosts`` when the
        validation context carries them (``webhook_allowed_hosts``: the node's load)."""
        allowed = (info.context or {}).get("webhook_allowed_hosts")
        return None if v is None else check_url(v, allowed_hosts=allowed)

    @field_validator("inputs")
    @classmethod
    def _non_empty(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for role, phases in v.items():
            if not phases:
                raise ValueError(f"input {role!r} needs at least one phase")
        return v


def check_against_models(
    pipelines: Mapping[str, PipelineSpec],
    known_models: Mapping[str, Sequence[str]],
    source: str = "<catalog>",
) -> list[str]:
    """Problems of the catalog against the model registry (model id -> its channel roles).

    One line per unknown model or crop model, and per model input role the pipeline does
    not declare; [] when all is well.
    """
    problems = []
    for name, pipe in pipelines.items():
        if pipe.crop is not None and pipe.crop.to_model not in known_models:
            problems.append(
                f"{source}: pipeline {name!r}: crop model {pipe.crop.to_model!r} is unknown"
            )
        for model in pipe.models:
            if model not in known_models:
                problems.append(f"{source}: pipeline {name!r}: unknown model {model!r}")
                continue
            missing = [c for c in known_models[model] if c not in pipe.inputs]
            if missing:
                problems.append(
                    f"{source}: pipeline {name!r}: model {model!r} reads inputs {missing} "
                    f"that the pipeline does not declare (inputs: {sorted(pipe.inputs)})"
                )
    return problems


def parse_catalog(
    raw: Any, source: str = "<catalog>", known_models: Mapping[str, Sequence[str]] | None = None
) -> dict[str, PipelineSpec]:
    """The ``pipelines`` mapping of a parsed rules document, validated.

    Raises ``CatalogError`` naming each pipeline and its problem.
    """
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise CatalogError(f"{source}: pipelines must be a mapping of name -> pipeline")
    pipelines: dict[str, PipelineSpec] = {}
    problems: list[str] = []
    for name, body in raw.items():
        try:
            pipelines[str(name)] = PipelineSpec.model_validate(body)
        except ValidationError as exc:
            for e in exc.errors():
                where = ".".join(map(str, e["loc"]))
                problems.append(
                    f"{source}: pipeline {name!r}: {where}: "
                    f"{e['msg'].removeprefix('Value error, ')}"
                )
    if known_models is not None:
        problems += check_against_models(pipelines, known_models, source)
    if problems:
        raise CatalogError("\n".join(problems))
    return pipelines


def load_catalog(
    path: Path, known_models: Mapping[str, Sequence[str]] | None = None
) -> dict[str, PipelineSpec]:
    """Read the ``pipelines:`` section of the rules file at ``path``.

    Raises ``CatalogError`` when the file cannot be read or a pipeline is invalid.
    """
    try:
        document = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CatalogError(f"pipeline catalog {path} cannot be read: {exc}") from None
    if not isinstance(document, dict):
        raise CatalogError(f"pipeline catalog {path}: the file must be a mapping")
    return parse_catalog(document.get("pipelines"), str(path), known_models)


class PipelineCatalog:
    """The pipelines in force, re-read when the file changes.

    A broken edit is logged and the previous catalog stays in force; at construction a
    broken file raises ``CatalogError``.
    """

    def __init__(
        self, path: Path, known_models: Mapping[str, Sequence[str]] | None = None
    ) -> None:
        self.path = Path(path)
        self.known_models = known_models
        self._lock = threading.Lock()
        self._mtime = self._stat()
        self._pipelines = load_catalog(self.path, known_models)

    def _stat(self) -> int | None:
        try:
            return self.path.stat().st_mtime_ns
        except OSError:
            return None

    def pipelines(self) -> dict[str, PipelineSpec]:
        """All pipelines by name (reloaded first when the file changed)."""
        mtime = self._stat()
        if mtime != self._mtime:
            with self._lock:
                if mtime != self._mtime:
                    self._mtime = mtime
                    try:
                        self._pipelines = load_catalog(self.path, self.known_models)
                    except CatalogError as exc:
                        log.error("pipeline catalog reload failed, previous stays: %s", exc)
        return self._pipelines

    def get(self, name: str) -> PipelineSpec | None:
        """The pipeline ``name``, or None when the catalog does not define it."""
        return self.pipelines().get(name)
