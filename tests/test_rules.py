"""The routing rules language: matching, validation messages, hot reload."""

from __future__ import annotations

import os
import time

import pytest

from dicom_node.conditions import evaluate
from dicom_node.rules import RulesError, load_rules, parse_rules
from dicom_node.rules_holder import RulesHolder
from kernel.settings import REPO_ROOT

PV = {
    "Modality": "CT",
    "SeriesDescription": "ABD 2.5mm PORTAL VENOUS",
    "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
    "SliceThickness": "2.5",
    "InstanceCount": 80,
}


@pytest.mark.parametrize(
    ("cond", "expected"),
    [
        ({"Modality": "ct"}, True),
        ({"Modality": ["MR", "CT"]}, True),
        ({"Modality": {"one_of": ["MR", "PT"]}}, False),
        ({"SeriesDescription": {"regex": r"portal|\bPVP\b"}}, True),
        ({"ImageType": "AXIAL"}, True),
        ({"SliceThickness": {"range": {"min": 1, "max": 3}}}, True),
        ({"InstanceCount": {"range": {"min": 100}}}, False),
        ({"ContrastBolusAgent": {"exists": False}}, True),
        ({"ContrastBolusAgent": "x"}, False),
        ({"any": [{"Modality": "MR"}, {"Modality": "CT"}]}, True),
        ({"not": {"Modality": "CT"}}, False),
        ({"all": [{"Modality": "CT"}, {"not": {"SeriesDescription": {"regex": "scout"}}}]}, True),
    ],
)
def test_conditions(cond, expected):
    ok, reasons = evaluate(cond, PV)
    assert ok is expected
    assert reasons  # every decision explains itself


def test_shipped_rules_send_contrast_ct_to_tumor_vessel_and_ureter():
    rules = load_rules(REPO_ROOT / "routing_rules.yaml")
    attrs = {**PV, "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2", "Phase": "P", "Orientation": "axial"}
    decision = rules.decide(attrs)
    assert decision.pipelines == ["tumor", "vessel", "ureter"]
    assert "Phase 'P' matches" in decision.reasons[0]
    assert rules.decide({**attrs, "Phase": "N"}).pipelines == []
    assert rules.decide({**attrs, "Phase": "unknown"}).pipelines == []


def test_first_match_and_all_match():
    text = """
pipelines: {a: {models: [m]}, b: {models: [m]}}
rules:
  - name: one
    when: {Modality: CT}
    pipelines: [a]
  - name: two
    when: {Modality: CT}
    pipelines: [b]
"""
    assert parse_rules(text).decide(PV).pipelines == ["a", "b"]
    stopped = text.replace("pipelines: [a]", "pipelines: [a]\n    stop: true")
    assert parse_rules(stopped).decide(PV).pipelines == ["a"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # The line of the key at fault (issue 15: not the first "- name:" of the file).
        ("rules:\n  - name: x\n    when: {Modality: {regex: '('}}\n", "line 3: rules.0.when"),
        ("rules:\n  - name: x\n    pipelines: [nope]\n", "line 3: rule 'x': unknown pipeline"),
        ("rules:\n  - name: x\n    when: [1, 2]\n", "line 3: rules.0.when"),
        ("rules: [\n", "line 2"),
        ("rules:\n  - name: x\n    colour: red\n", "rules.0.colour: Extra inputs"),
    ],
)
def test_broken_rules_name_the_line_and_reason(text, message):
    with pytest.raises(RulesError) as err:
        parse_rules(text, "rules.yaml")
    assert message in str(err.value)


def test_hot_reload_with_a_broken_file_keeps_the_old_rules(tmp_path):
    path = tmp_path / "rules.yaml"
    good = (
        "pipelines: {a: {models: [m]}}\n"
        "rules:\n  - {name: r, when: {Modality: CT}, pipelines: [a]}\n"
    )
    path.write_text(good)
    holder = RulesHolder(path)
    assert holder.get().decide(PV).pipelines == ["a"]

    path.write_text("rules:\n  - name: r\n    pipelines: [missing]\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert holder.get().decide(PV).pipelines == ["a"]
    assert holder.last_reload.ok is False
    assert "unknown pipeline 'missing'" in holder.last_reload.message

    path.write_text(good.replace("Modality: CT", "Modality: MR"))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2_000_000))
    assert holder.get().decide(PV).pipelines == []
    assert holder.last_reload.ok is True


@pytest.mark.parametrize(
    ("iop", "expected"),
    [
        ([1, 0, 0, 0, 1, 0], "axial"),
        ([1, 0, 0, 0, 0, -1], "coronal"),
        ([0, 1, 0, 0, 0, -1], "sagittal"),
        ([1, 0, 0, 0, 0.7071, 0.7071], "oblique"),
        (None, None),
    ],
)
def test_derived_orientation(iop, expected):
    from dicom_node.planning import derived_attributes

    assert derived_attributes({"ImageOrientationPatient": iop})["Orientation"] == expected


def test_rules_can_test_derived_values_and_set_priority():
    text = """
pipelines: {a: {models: [m]}}
rules:
  - name: thin-axial-from-ct1
    when: {Orientation: axial, SliceSpacing: {range: {max: 3}}, CallingAE: CT1}
    pipelines: [a]
    priority: urgent
"""
    rules = parse_rules(text)
    attrs = {"Orientation": "axial", "SliceSpacing": 2.5, "CallingAE": "CT1"}
    decision = rules.decide(attrs)
    assert decision.pipelines == ["a"] and decision.priority == "urgent"
    assert rules.decide({**attrs, "SliceSpacing": 5.0}).pipelines == []
