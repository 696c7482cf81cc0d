"""What should happen to a study: phases, rule decisions and pipeline inputs.

Pure functions over series attributes, shared by the live node (``routing.Router``) and
``dicom-node route explain``, so both always tell the same story.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dicom_node.phases import PhaseResult
from dicom_node.rules import RoutingDecision, RuleSet


@dataclass
class SeriesPlan:
    series_uid: str
    study_uid: str
    phase: PhaseResult
    decision: RoutingDecision
    instance_count: int = 0


@dataclass
class PipelinePlan:
    pipeline: str
    inputs: dict[str, str] = field(default_factory=dict)  # role -> series UID
    fallback_roles: list[str] = field(default_factory=list)  # resolved by a later phase
    missing: dict[str, list[str]] = field(default_factory=dict)  # role -> phases wanted

    @property
    def ready(self) -> bool:
        """Every input has a series of its most preferred phase: run now."""
        return not self.missing and not self.fallback_roles

    @property
    def runnable(self) -> bool:
        """Every input has some acceptable series (maybe a fallback)."""
        return not self.missing

    def explain(self) -> str:
        if self.ready:
            return f"{self.pipeline}: ready with {self.inputs}"
        if self.runnable:
            return (
                f"{self.pipeline}: inputs {self.fallback_roles} only from fallback phases; "
                "runs when the study is settled"
            )
        wanted = ", ".join(f"{r} needs {'/'.join(p)}" for r, p in self.missing.items())
        return f"{self.pipeline}: waiting ({wanted})"


def orientation(iop: Any) -> str | None:
    """axial / coronal / sagittal / oblique from ImageOrientationPatient."""
    try:
        values = [float(v) for v in iop]
    except (TypeError, ValueError):
        return None
    if len(values) != 6:
        return None
    row, col = values[:3], values[3:]
    normal = [
        row[1] * col[2] - row[2] * col[1],
        row[2] * col[0] - row[0] * col[2],
        row[0] * col[1] - row[1] * col[0],
    ]
    axis = max(range(3), key=lambda i: abs(normal[i]))
    if abs(normal[axis]) < 0.9:  # more than ~25 degrees off every main plane
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def derived_attributes(header: dict[str, Any]) -> dict[str, Any]:
    """Values rules may test besides DICOM keywords: Orientation, SliceSpacing."""
    spacing = header.get("SpacingBetweenSlices") or header.get("SliceThickness")
    try:
        spacing = float(spacing) if spacing not in (None, "") else None
    except (TypeError, ValueError):
        spacing = None
    return {
        "Orientation": orientation(header.get("ImageOrientationPatient")),
        "SliceSpacing": spacing,
    }


def series_attributes(attrs: dict[str, Any], phase: PhaseResult) -> dict[str, Any]:
    """Attributes rules see: the header plus the derived phase values."""
    return {**attrs, "Phase": phase.phase, "PhaseConfidence": phase.confidence}


def plan_study(
    rules: RuleSet, study_series: dict[str, dict[str, Any]]
) -> tuple[dict[str, SeriesPlan], dict[str, PipelinePlan]]:
    """Classify, decide and resolve pipelines for the complete series of one study.

    ``study_series`` maps series UID -> attributes (header of one instance plus derived
    values such as InstanceCount, CallingAE).
    """
    phases = rules.classifier.classify_study(study_series)
    series_plans: dict[str, SeriesPlan] = {}
    requested: list[str] = []
    for uid, attrs in study_series.items():
        decision = rules.decide(series_attributes(attrs, phases[uid]))
        series_plans[uid] = SeriesPlan(
            series_uid=uid,
            study_uid=str(attrs.get("StudyInstanceUID", "")),
            phase=phases[uid],
            decision=decision,
            instance_count=int(attrs.get("InstanceCount") or 0),
        )
        if not decision.discard:
            requested += [p for p in decision.pipelines if p not in requested]
    eligible = [p for p in series_plans.values() if not p.decision.discard]
    pipelines = {name: resolve_inputs(rules, name, eligible) for name in requested}
    return series_plans, pipelines


def resolve_inputs(rules: RuleSet, pipeline: str, candidates: list[SeriesPlan]) -> PipelinePlan:
    """Pick one series per input role, most preferred phase first, then confidence."""
    plan = PipelinePlan(pipeline)
    for role, wanted in rules.pipelines[pipeline].inputs.items():
        for rank, phase in enumerate(wanted):
            matches = [c for c in candidates if c.phase.phase == phase]
            if matches:
                best = max(matches, key=lambda c: (c.phase.confidence, c.instance_count))
                plan.inputs[role] = best.series_uid
                if rank > 0:
                    plan.fallback_roles.append(role)
                break
        else:
            plan.missing[role] = list(wanted)
    return plan
