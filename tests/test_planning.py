"""Which series feed a pipeline: only those a rule sent to it, by a documented preference."""

from __future__ import annotations

import itertools

from dicom_node.planning import plan_study
from dicom_node.rules import parse_rules

RULES = parse_rules(
    """
version: 1
phases:
  keywords:
    A: ['arterial']
    P: ['portal']
pipelines:
  tumor:
    models: [tumor]
    inputs: {image: [P, A]}
rules:
  - name: axial-contrast
    when: {Modality: CT, Orientation: axial, Phase: [A, P]}
    pipelines: [tumor]
"""
)


def series(
    uid: str,
    description: str = "ABD PORTAL",
    *,
    kind: str = "ORIGINAL",
    orientation: str = "axial",
    spacing: float = 2.5,
    count: int = 100,
    incomplete: list[str] | None = None,
) -> tuple[str, dict]:
    return uid, {
        "Modality": "CT",
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
        "StudyInstanceUID": "1.2.3",
        "SeriesDescription": description,
        "ContrastBolusAgent": "IOPAMIDOL",
        "ImageKind": kind,
        "Orientation": orientation,
        "SliceSpacing": spacing,
        "InstanceCount": count,
        "Incomplete": incomplete or [],
    }


def chosen(items: list[tuple[str, dict]], target_mm: float | None = 2.0) -> set[str]:
    """The tumour input for every order of the series (must be one answer)."""
    answers = set()
    for order in itertools.permutations(items):
        _, pipelines = plan_study(RULES, dict(order), lambda _name: target_mm)
        answers.add(pipelines["tumor"].inputs.get("image") if "tumor" in pipelines else None)
    return answers


def test_a_coronal_reformat_with_more_images_is_never_an_input():
    items = [series("1.1", count=80), series("1.2", orientation="coronal", count=400)]
    assert chosen(items) == {"1.1"}


def test_a_series_no_rule_sent_there_never_feeds_the_pipeline():
    items = [series("1.2", orientation="coronal", count=400)]
    _, pipelines = plan_study(RULES, dict(items))
    assert pipelines == {}  # nothing asked for tumor: no job, whatever the phase is


def test_original_before_derived_even_when_derived_is_closer_to_the_model_spacing():
    items = [series("1.1", spacing=5.0), series("1.2", kind="DERIVED", spacing=2.0, count=250)]
    assert chosen(items) == {"1.1"}


def test_whole_before_incomplete_then_spacing_closest_to_the_model():
    items = [
        series("1.1", spacing=2.0, incomplete=["InstanceNumbers 1..100 with 3 missing"]),
        series("1.2", spacing=5.0),
        series("1.3", spacing=1.0),
    ]
    assert chosen(items, target_mm=2.0) == {"1.3"}  # 1 mm is closer to 2 mm than 5 mm


def test_the_explanation_names_the_chosen_series_and_the_others():
    items = dict([series("1.1", count=80), series("1.3", kind="DERIVED", count=300)])
    _, pipelines = plan_study(RULES, items, lambda _name: 2.0)
    why = pipelines["tumor"].choices["image"]
    assert why.startswith("1.1 (P") and "ORIGINAL axial" in why
    assert "preferred over 1.3" in why and "DERIVED" in why


def test_an_incomplete_input_waits_for_the_study_to_settle():
    items = dict([series("1.1", incomplete=["slice positions jump 10 mm"])])
    _, pipelines = plan_study(RULES, items)
    plan = pipelines["tumor"]
    assert not plan.ready and plan.runnable
    assert "may be incomplete (slice positions jump 10 mm)" in plan.explain()


VESSEL_RULES = parse_rules(
    """
version: 1
study_timeout_s: 300
phases:
  keywords:
    A: ['arterial']
    P: ['portal']
pipelines:
  vessel:
    models: [vessel]
    inputs: {A: [A], P: [P]}
  tumor:
    models: [tumor]
    inputs: {image: [P, A]}
rules:
  - name: axial-contrast
    when: {Modality: CT, Orientation: axial, Phase: [A, P]}
    pipelines: [vessel, tumor]
"""
)


def test_a_waiting_pipeline_says_which_series_it_waits_for_and_when_the_wait_ends():
    _, pipelines = plan_study(VESSEL_RULES, dict([series("1.1")]))  # portal venous only
    vessel = pipelines["vessel"]
    assert vessel.explain("14:03:12") == (
        "vessel: waiting for an arterial (A) series; none received yet; if none arrives it "
        "does not run when the study settles at 14:03:12 (study_timeout_s 300 s)"
    )
    assert vessel.explain().endswith(  # route explain: no study clock
        "when the study settles (study_timeout_s 300 s after its last instance)"
    )
    assert vessel.not_run() == (
        "vessel: not run: no arterial (A) series arrived before the study settled"
    )
    # An arterial series only: tumor takes it as its fallback when the study settles.
    _, pipelines = plan_study(VESSEL_RULES, dict([series("1.2", "ABD ARTERIAL")]))
    assert pipelines["tumor"].explain("14:03:12") == (
        "tumor: image: no portal venous (P) series yet, only an arterial (A) one; runs with "
        "what is there when the study settles at 14:03:12 (study_timeout_s 300 s)"
    )
    # An arterial series no rule sends to vessel (coronal) is named as such.
    items = dict([series("1.1"), series("1.3", "ABD ARTERIAL", orientation="coronal")])
    _, pipelines = plan_study(VESSEL_RULES, items)
    assert (
        pipelines["vessel"]
        .explain("14:03:12")
        .startswith(
            "vessel: waiting for an arterial (A) series; an arterial (A) series arrived but no "
            "rule sends it to vessel; if none arrives"
        )
    )
