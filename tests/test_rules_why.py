"""Why a rule did not match: each rule's first failing condition, in words; and a broken
edit of the rules file reported at the line of the key at fault."""

from __future__ import annotations

import pytest

from dicom_node.conditions import first_failure
from dicom_node.explain import format_text
from dicom_node.rules import RulesError, load_rules, parse_rules
from kernel.settings import REPO_ROOT

CORONAL_P = {
    "Modality": "CT",
    "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
    "Orientation": "coronal",
    "Phase": "P",
    "SliceSpacing": 2.5,
    "SeriesDescription": "PV COR",
}


@pytest.mark.parametrize(
    ("cond", "why"),
    [
        ({"Orientation": "axial"}, "Orientation coronal is not axial"),
        ({"Phase": ["A", "D"]}, "Phase P is not one of A, D"),
        ({"Modality": {"one_of": ["MR", "PT"]}}, "Modality CT is not one of MR, PT"),
        ({"SliceSpacing": {"range": {"min": 0.5, "max": 2}}}, "SliceSpacing 2.5 is not in 0.5..2"),
        ({"SeriesDescription": {"regex": "^AX"}}, "SeriesDescription PV COR does not match /^AX/"),
        ({"ContrastBolusAgent": {"exists": True}}, "ContrastBolusAgent is missing"),
        ({"BodyPartExamined": "ABDOMEN"}, "BodyPartExamined is missing (wanted ABDOMEN)"),
        (
            {"all": [{"Modality": "CT"}, {"Orientation": "axial"}]},
            "Orientation coronal is not axial",
        ),
        (
            {"any": [{"Orientation": "axial"}, {"Phase": "A"}]},
            "none of: Orientation coronal is not axial; Phase P is not A",
        ),
        ({"not": {"Modality": "CT"}}, "excluded by not: Modality 'CT' matches 'CT'"),
        ({"Modality": "CT", "Phase": "P"}, None),
    ],
)
def test_first_failure_names_the_condition_in_words(cond, why):
    assert first_failure(cond, CORONAL_P) == why


def test_no_rule_matched_says_which_condition_of_each_rule_failed():
    rules = load_rules(REPO_ROOT / "routing_rules.yaml")
    decision = rules.decide(CORONAL_P)
    assert decision.matched_rules == []
    assert decision.not_matched == ["contrast-ct-kidney: Orientation coronal is not axial"]
    assert decision.summary() == (
        "no rule matched: contrast-ct-kidney: Orientation coronal is not axial"
    )
    matched = rules.decide({**CORONAL_P, "Orientation": "axial"})
    assert matched.not_matched == [] and matched.summary().startswith("rule 'contrast-ct-kidney'")


def test_route_explain_text_lists_the_failing_condition():
    item = {
        "series_uid": "1.2.3",
        "study_uid": "1.2",
        "phase": "P",
        "confidence": 0.9,
        "reasons": [],
        "rule": None,
        "not_matched": ["contrast-ct-kidney: Orientation coronal is not axial"],
        "pipelines": [],
        "inputs": {},
        "forward": [],
    }
    text = format_text([item])
    assert "(none matched)" in text
    assert "- contrast-ct-kidney: Orientation coronal is not axial" in text


def test_a_broken_edit_of_the_shipped_rules_names_its_own_line():
    text = (REPO_ROOT / "routing_rules.yaml").read_text()
    lines = text.splitlines()
    # Break the routing rule's condition (after the phase rules, which also have names).
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("Orientation: axial"))
    lines[at] = lines[at].replace("axial", "{regex: '('}")
    with pytest.raises(RulesError) as err:
        parse_rules("\n".join(lines), "routing_rules.yaml")
    when_line = next(i + 1 for i in range(at, 0, -1) if lines[i].strip() == "when:")
    assert f"line {when_line}: rules.0.when" in str(err.value)
    # A pipeline's bad key points at that key, not at the top-level `pipelines:`.
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip() == "models: [tumor]")
    lines[at] = lines[at].replace("models: [tumor]", "models: []")
    with pytest.raises(RulesError) as err:
        parse_rules("\n".join(lines), "routing_rules.yaml")
    assert f"line {at + 1}: pipelines.tumor.models" in str(err.value)
