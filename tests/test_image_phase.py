"""The contrast phase from image measurements, and from the gaps between series.

Unit tests of the rules that turn HU into a phase (``dicom_node.image_phase``) and of the
classifier that weighs them with the tags; the hold-out on the phantom with the real
organ model is ``tests/test_phase_holdout.py``.
"""

from __future__ import annotations

import copy

import pytest

from devkit.synth import generate_study
from dicom_node.image_phase import ImageThresholds, phase_from_image
from dicom_node.instance import header_attributes
from dicom_node.rules import load_rules
from kernel.settings import REPO_ROOT

RULES = load_rules(REPO_ROOT / "routing_rules.yaml")
T = ImageThresholds()
GENERIC = {"SeriesDescription": "Abdomen 3.0 B30f", "ProtocolName": None}


def measured(aorta, venous, kidney=150.0, excreted=0.0, cmd=0.0):
    return {
        "model": "organs_6mm",
        "hu": {"aorta": aorta, "venous": venous, "kidney": kidney},
        "excreted_ml": excreted,
        "corticomedullary_hu": cmd,
    }


@pytest.mark.parametrize(
    "numbers, phase",
    [
        (measured(38, 41, 30), "N"),
        (measured(60, 55, 40), "N"),
        (measured(300, 70, 160), "A"),
        (measured(220, 120, 150, cmd=70), "A"),
        (measured(160, 150, 180), "P"),
        (measured(190, 170, 180), "P"),
        (measured(100, 101, 130), "D"),  # equilibrium
        (measured(160, 150, 180, excreted=1.2), "D"),  # contrast in the collecting system
        (measured(300, 270, 150, excreted=0.0), "P"),  # a bright but balanced bolus
    ],
)
def test_known_physiology_gives_the_phase(numbers, phase):
    assert phase_from_image(numbers, T)[0] == phase


@pytest.mark.parametrize(
    "numbers, why",
    [
        ({"hu": {"aorta": None}}, "no aorta"),
        ({"hu": {"aorta": 200}}, "no portal vein / IVC"),
        (measured(150, 60), "fit no phase"),  # enhanced aorta, veins neither near nor far
    ],
)
def test_numbers_that_fit_no_phase_give_none_with_the_reason(numbers, why):
    phase, reason = phase_from_image(numbers, T)
    assert phase is None and why in reason


@pytest.fixture(scope="module")
def headers(tmp_path_factory):
    out = tmp_path_factory.mktemp("phases")
    study = generate_study(out, seed=3, rows=16, columns=16, slices=2)
    return {s.phase: {**header_attributes(s.files[0]), "InstanceCount": 2} for s in study.series}


def _protocol(headers, phases: str, **changes) -> dict[str, dict]:
    series = {}
    for phase in phases:
        attrs = copy.deepcopy(headers[phase])
        attrs.update(GENERIC)
        for key, value in changes.items():
            if value is None:
                attrs.pop(key, None)
            else:
                attrs[key] = value
        series[f"{phase}-uid"] = attrs
    return series


def _phases(results) -> dict[str, str]:
    return {uid.split("-")[0]: r.phase for uid, r in results.items()}


def test_first_contrast_series_is_not_assumed_arterial(headers):
    """P + D without bolus time: the long gap says portal venous then delayed."""
    series = _protocol(headers, "PD", ContrastBolusStartTime=None)
    results = RULES.classifier.classify_study(series)
    assert _phases(results) == {"P": "P", "D": "D"}
    assert any("pattern P -> D" in r for r in results["P-uid"].reasons)


def test_a_single_contrast_series_gets_no_timing_vote_and_asks_the_image(headers):
    series = _protocol(headers, "P", ContrastBolusStartTime=None)
    results = RULES.classifier.classify_study(series)
    assert _phases(results) == {"P": "unknown"}
    assert RULES.classifier.wants_image(results) == ["P-uid"]
    with_image = RULES.classifier.classify_study(
        series, {"P-uid": {"state": "ready", "measurements": measured(158, 151, 178)}}
    )["P-uid"]
    assert with_image.phase == "P" and with_image.confidence >= 0.7
    assert any(r.startswith("image (organs_6mm): aorta 158 HU") for r in with_image.reasons)


def test_waiting_for_the_image_keeps_the_phase_unknown(headers):
    series = _protocol(headers, "P", ContrastBolusStartTime=None)
    result = RULES.classifier.classify_study(series, {"P-uid": {"state": "pending"}})["P-uid"]
    assert result.phase == "unknown" and result.waiting_for_image
    assert "waiting for image evidence (model organs_6mm)" in result.reasons


def test_no_image_evidence_is_a_reason_not_a_crash(headers):
    series = _protocol(headers, "P", ContrastBolusStartTime=None)
    result = RULES.classifier.classify_study(
        series, {"P-uid": {"state": "none", "reason": "model organs_6mm found no aorta"}}
    )["P-uid"]
    assert result.phase == "unknown"
    assert "no image evidence (model organs_6mm found no aorta)" in result.reasons


def test_image_against_strong_tags_lowers_the_confidence(headers):
    series = _protocol(headers, "A", SeriesDescription="ABD ARTERIAL")
    tags_only = RULES.classifier.classify_study(series)["A-uid"]
    assert tags_only.phase == "A"
    assert RULES.classifier.wants_image({"A-uid": tags_only}) == []  # clear tags: no cost
    against = RULES.classifier.classify_study(
        series, {"A-uid": {"state": "ready", "measurements": measured(160, 150)}}
    )["A-uid"]
    assert against.confidence < tags_only.confidence
    assert any("conflict" in r for r in against.reasons)


def test_scouts_never_ask_the_image(headers):
    series = _protocol(headers, "P", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    results = RULES.classifier.classify_study(series)
    assert RULES.classifier.wants_image(results) == []
