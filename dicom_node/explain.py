"""``dicom-node route explain``: what the node would do with these files, and why."""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from dicom_node.instance import header_attributes
from dicom_node.planning import derived_attributes, plan_study
from dicom_node.rules import RuleSet


def dicom_files(paths: Iterable[str | Path]) -> Iterable[Path]:
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            yield path
        else:
            raise FileNotFoundError(f"{path} does not exist")


def collect_series(paths: Iterable[str | Path]) -> dict[str, dict[str, dict[str, Any]]]:
    """study UID -> series UID -> attributes (first instance + InstanceCount)."""
    first: dict[tuple[str, str], Path] = {}
    counts: dict[tuple[str, str], int] = defaultdict(int)
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
        first.setdefault(key, path)
        counts[key] += 1
    studies: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for (study_uid, series_uid), path in first.items():
        attrs = header_attributes(path)
        attrs.update(derived_attributes(attrs))
        attrs["InstanceCount"] = counts[(study_uid, series_uid)]
        studies[study_uid][series_uid] = attrs
    return studies


def explain(rules: RuleSet, paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for study_uid, series in collect_series(paths).items():
        series_plans, pipeline_plans = plan_study(rules, series)
        for uid, plan in series_plans.items():
            pipelines = sorted(
                name
                for name, p in pipeline_plans.items()
                if p.runnable and uid in p.inputs.values()
            )
            items.append(
                {
                    "series_uid": uid,
                    "study_uid": study_uid,
                    "phase": plan.phase.phase,
                    "confidence": plan.phase.confidence,
                    "reasons": plan.phase.reasons + plan.decision.reasons,
                    "rule": ", ".join(plan.decision.matched_rules) or None,
                    "pipelines": pipelines,
                    "forward": [] if plan.decision.discard else plan.decision.forward,
                }
            )
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
        lines.append(f"  rule:       {item['rule'] or '(none matched)'}")
        lines.append(f"  pipelines:  {', '.join(item['pipelines']) or '-'}")
        lines.append(f"  forward to: {', '.join(item['forward']) or '-'}")
    return "\n".join(lines)
