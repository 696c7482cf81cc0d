"""The phase hold-out: generic-tag studies of unseen phantom seeds in the four commonest
protocols, classified by tags alone and by tags plus image evidence.

Protocols (what sites send when their descriptions say nothing about the phase):

- ``P``: a routine portal venous abdomen, no bolus start time;
- ``PD``: portal venous + delayed, no bolus start time;
- ``AP-untagged``: arterial + portal venous without contrast agent tags or times of
  injection;
- ``NAPD-untimed``: all four phases without any acquisition or bolus time.

Used by ``tests/test_phase_holdout.py`` and ``bench/bench_phase_evidence.py``.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from devkit.phantom import Phantom
from devkit.synth import generate_study, phantom_volumes, series_geometry
from dicom_node.instance import header_attributes
from dicom_node.rules import RuleSet
from inference.phase_evidence import measure
from inference.volume import Volume

TIME_KEYS = ("AcquisitionTime", "ContentTime", "SeriesTime", "ContrastBolusStartTime")
CONTRAST_KEYS = ("ContrastBolusAgent", "ContrastBolusRoute", "ContrastBolusVolume")
GENERIC = ("Abdomen 3.0 B30f", "5mm STND", "ABD/PEL 2.5", "Body 1.0 I30f")
PROTOCOLS: dict[str, tuple[str, tuple[str, ...]]] = {
    "P": ("P", ("ContrastBolusStartTime",)),
    "PD": ("PD", ("ContrastBolusStartTime",)),
    "AP-untagged": ("AP", CONTRAST_KEYS + ("ContrastBolusStartTime",)),
    "NAPD-untimed": ("NAPD", TIME_KEYS),
}


@dataclass
class Outcome:
    """One series: its true phase and what each method said, with confidence."""

    protocol: str
    seed: int
    truth: str
    tags: tuple[str, float]
    image: tuple[str, float]
    reasons: list[str] = field(default_factory=list)


def _templates(seed: int) -> dict[str, dict[str, Any]]:
    """Real headers written by the generator (tiny images: only the tags are used)."""
    with tempfile.TemporaryDirectory() as tmp:
        study = generate_study(Path(tmp), seed=seed, rows=16, columns=16, slices=2)
        return {s.phase: header_attributes(s.files[0]) for s in study.series}


def _series(templates: dict[str, dict[str, Any]], phases: str, dropped: tuple[str, ...]):
    series = {}
    for n, phase in enumerate(phases):
        attrs = copy.deepcopy(templates[phase])
        attrs["SeriesDescription"] = GENERIC[n % len(GENERIC)]
        attrs.pop("ProtocolName", None)
        for key in dropped:
            attrs.pop(key, None)
        attrs["InstanceCount"] = 80
        series[f"{phase}-uid"] = attrs
    return series


def phantom_volume(array: np.ndarray, spacing_zyx, origin_lps, uid: str) -> Volume:
    return Volume(
        array=array.astype(np.float32),
        spacing_zyx=tuple(float(s) for s in spacing_zyx),
        origin_lps=tuple(float(o) for o in origin_lps),
        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
        series_uid=uid,
    )


def run(
    rules: RuleSet,
    engine: Any,
    seeds: list[int],
    *,
    rows: int = 80,
    pixel_spacing_mm: float = 5.0,
    timings: list[float] | None = None,
) -> list[Outcome]:
    """Classify every protocol of every seed by tags alone and by tags + image evidence
    (measured with ``engine`` on the phantom's voxels, only for the series whose tags are
    weak, as the live node does)."""
    evidence = rules.spec.phases.image_evidence
    outcomes: list[Outcome] = []
    for seed in seeds:
        templates = _templates(seed)
        geometry = series_geometry(Phantom(seed), rows=rows, columns=rows,
                                   pixel_spacing_mm=pixel_spacing_mm)  # fmt: skip
        volumes, _truth = phantom_volumes(seed, "NAPD", geometry)
        measured: dict[str, dict[str, Any]] = {}
        for name, (phases, dropped) in PROTOCOLS.items():
            series = _series(templates, phases, dropped)
            by_tags = rules.classifier.classify_study(series)
            image = {}
            for uid in rules.classifier.wants_image(by_tags):
                phase = uid.split("-")[0]
                if phase not in measured:
                    volume = phantom_volume(
                        volumes[phase], geometry.spacing_zyx, geometry.origin_lps,
                        f"{seed}-{phase}",
                    )  # fmt: skip
                    started = time.perf_counter()
                    measured[phase] = measure(engine, evidence.model, volume, evidence.structures)
                    if timings is not None:
                        timings.append(time.perf_counter() - started)
                image[uid] = {"state": "ready", "measurements": measured[phase]}
            with_image = rules.classifier.classify_study(series, image)
            for uid in series:
                outcomes.append(
                    Outcome(
                        protocol=name,
                        seed=seed,
                        truth=uid.split("-")[0],
                        tags=(by_tags[uid].phase, by_tags[uid].confidence),
                        image=(with_image[uid].phase, with_image[uid].confidence),
                        reasons=with_image[uid].reasons,
                    )
                )
    return outcomes


def score(outcomes: list[Outcome], method: str) -> tuple[int, int, int]:
    """(correct, total, wrong with confidence >= 0.7) of ``method`` ("tags" or "image")."""
    correct = wrong_confident = 0
    for o in outcomes:
        phase, confidence = getattr(o, method)
        correct += phase == o.truth
        wrong_confident += phase not in (o.truth, "unknown") and confidence >= 0.7
    return correct, len(outcomes), wrong_confident
