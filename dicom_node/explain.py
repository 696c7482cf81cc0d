"""``dicom-node route explain`` and the rules page's dry run: what the node would do with
these series, and why.

Both read a whole study (files for ``route explain``, received rows for the dry run) and
run the same planning as the live router (``planning.plan_study`` over
``series_attrs`` attributes), so all three always give the same answer.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Instance, Series, Study
from dicom_node import series_attrs
from dicom_node.planning import ImageLookup, PipelinePlan, plan_study
from dicom_node.routing import series_attributes
from dicom_node.rules import RuleSet
from dicom_node.series_attrs import InstanceRow
from kernel.vocabulary import SeriesState


def dicom_files(paths: Iterable[str | Path]) -> Iterable[Path]:
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            yield path
        else:
            raise FileNotFoundError(f"{path} does not exist")


def series_files(paths: Iterable[str | Path]) -> dict[str, list[Path]]:
    """series UID -> its files among ``paths`` (files that are not DICOM are skipped)."""
    out: dict[str, list[Path]] = defaultdict(list)
    for path in dicom_files(paths):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except (InvalidDicomError, OSError, EOFError):
            continue
        out[str(ds.get("SeriesInstanceUID", ""))].append(path)
    return dict(out)


def collect_series(paths: Iterable[str | Path]) -> dict[str, dict[str, dict[str, Any]]]:
    """study UID -> series UID -> attributes (``series_attrs.from_files``: the main stack's
    header and derived values, as the live node sees a received series)."""
    files: dict[tuple[str, str], list[Path]] = defaultdict(list)
    for path in dicom_files(paths):
        try:
            ds = pydicom.dcmread(
                path,
                stop_before_pixels=True,
                specific_tags=["StudyInstanceUID", "SeriesInstanceUID"],
            )
        except (InvalidDicomError, OSError, EOFError):
            print(f"skipped {path}: not a DICOM file", file=sys.stderr)
            continue
        key = (str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")))
        files[key].append(path)
    studies: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for (study_uid, series_uid), series_files in files.items():
        studies[study_uid][series_uid] = series_attrs.from_files(sorted(series_files))
    return studies


def received_study_series(session: Session, study: Study) -> dict[str, dict[str, Any]]:
    """series UID -> attributes of a received study's complete series, built exactly as
    the live router builds them (``Router._complete_series``: the stored stack fields of
    each instance, ``routing.series_attributes`` for the origin values)."""
    out: dict[str, dict[str, Any]] = {}
    for series in session.scalars(
        select(Series)
        .where(Series.study_id == study.id, Series.state == SeriesState.COMPLETE)
        .order_by(Series.id)
    ):
        rows = [
            InstanceRow(*row)
            for row in session.execute(
                select(
                    Instance.path,
                    Instance.stack_key,
                    Instance.slice_position_mm,
                    Instance.acquisition_number,
                    Instance.instance_number,
                )
                .where(Instance.series_id == series.id)
                .order_by(Instance.id)
            )
        ]
        if rows:
            out[series.series_uid] = series_attributes(series, rows)
    return out


def pipeline_items(pipeline_plans: dict[str, PipelinePlan]) -> list[dict[str, Any]]:
    """One item per pipeline the rules asked for: whether it runs now, later or not, why."""
    return [
        {
            "pipeline": name,
            "ready": p.ready,
            "runnable": p.runnable,
            "inputs": dict(p.inputs),
            "missing": {role: list(phases) for role, phases in p.missing.items()},
            "explain": p.explain(),
        }
        for name, p in sorted(pipeline_plans.items())
    ]


def explain_study(
    rules: RuleSet,
    study_uid: str,
    series: dict[str, dict[str, Any]],
    target_spacing_mm: Callable[[str], float | None] | None = None,
    image: ImageLookup | None = None,
) -> tuple[list[dict[str, Any]], dict[str, PipelinePlan]]:
    """The items of one study's series (see ``explain``) and its pipeline plans.

    ``image``: the image evidence of a series (``planning.plan_study``); the phase reasons
    then carry the HU measured.
    """
    series_plans, pipeline_plans = plan_study(rules, series, target_spacing_mm, image)
    items: list[dict[str, Any]] = []
    for uid, plan in series_plans.items():
        pipelines = sorted(
            name for name, p in pipeline_plans.items() if p.runnable and uid in p.inputs.values()
        )
        chosen = {
            f"{name}.{role}": p.choices[role]
            for name, p in sorted(pipeline_plans.items())
            for role, chosen_uid in p.inputs.items()
            if chosen_uid == uid
        }
        items.append(
            {
                "series_uid": uid,
                "study_uid": study_uid,
                "phase": plan.phase.phase,
                "confidence": plan.phase.confidence,
                "reasons": plan.phase.reasons + plan.decision.reasons,
                "rule": ", ".join(plan.decision.matched_rules) or None,
                "not_matched": plan.decision.not_matched,
                "pipelines": pipelines,
                "inputs": chosen,
                "forward": [] if plan.decision.discard else plan.decision.forward,
                "instances": plan.instance_count,
                "left_out": plan.left_out,
                "incomplete": plan.incomplete,
            }
        )
    return items, pipeline_plans


def explain(
    rules: RuleSet,
    paths: Iterable[str | Path],
    target_spacing_mm: Callable[[str], float | None] | None = None,
    image: Callable[[str, list[Path]], dict[str, Any] | None] | None = None,
) -> list[dict[str, Any]]:
    """One item per series: phase, reasons, rule (or each rule's first failing
    condition when none matched), the pipelines it feeds (with how it was chosen over
    other candidates), forwards, stacks left out and signs of missing slices.

    ``target_spacing_mm``: pipeline -> its first model's slice spacing, as the live node
    uses it to prefer among candidates (None: not used). ``image(files)``: the image
    evidence of a series, given its UID and files (the CLI measures it in-process with the
    registry's models, as a worker would); None: the phases come from the tags alone.
    """
    paths = list(paths)
    files_of = series_files(paths)
    lookup = (lambda uid: image(uid, files_of.get(uid, []))) if image is not None else None
    items: list[dict[str, Any]] = []
    for study_uid, series in collect_series(paths).items():
        study_items, pipeline_plans = explain_study(
            rules, study_uid, series, target_spacing_mm, lookup
        )
        items += study_items
        for p in pipeline_plans.values():
            if not p.runnable:
                print(f"study {study_uid}: {p.explain()}", file=sys.stderr)
    return items


def format_text(items: list[dict[str, Any]], descriptions: dict[str, str] | None = None) -> str:
    lines = []
    for item in items:
        lines.append(f"series {item['series_uid']}  (study {item['study_uid']})")
        if descriptions and item["series_uid"] in descriptions:
            lines.append(f"  description: {descriptions[item['series_uid']]}")
        lines.append(f"  phase:      {item['phase']}  confidence {item['confidence']:.2f}")
        for reason in item["reasons"]:
            lines.append(f"    - {reason}")
        if item["rule"]:
            lines.append(f"  rule:       {item['rule']}")
        elif item.get("not_matched"):
            lines.append("  rule:       (none matched)")
            for why in item["not_matched"]:
                lines.append(f"    - {why}")
        else:
            lines.append("  rule:       (none matched: the rules file has no rules)")
        lines.append(f"  pipelines:  {', '.join(item['pipelines']) or '-'}")
        for input_name, why in item.get("inputs", {}).items():
            lines.append(f"    - input {input_name}: {why}")
        lines.append(f"  forward to: {', '.join(item['forward']) or '-'}")
        for left in item.get("left_out", []):
            lines.append(f"  left out:   {left}")
        for problem in item.get("incomplete", []):
            lines.append(f"  incomplete: {problem} (its pipelines wait for the study to settle)")
    return "\n".join(lines)
