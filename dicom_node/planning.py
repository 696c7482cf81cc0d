"""What should happen to a study: phases, rule decisions and pipeline inputs.

Pure functions over series attributes, shared by the live node (``routing.Router``) and
``dicom-node route explain``, so both always tell the same story.

Which series feed a pipeline: only series that matched a rule naming that pipeline. For
each input role the role's phases are tried in order (most preferred first); among the
candidates of one phase the preference is, in this order:

1. ORIGINAL images before DERIVED ones (reformats, secondary captures);
2. axial before other orientations;
3. a series whose headers look whole before one with signs of missing slices;
4. slice spacing closest to the spacing the pipeline's first model works at;
5. higher phase confidence;
6. more images;
7. the smaller SeriesInstanceUID (so the choice never depends on arrival order).

A pipeline runs at once when every role has a series of its first phase that looks whole;
with a fallback phase, or an input whose headers suggest missing slices, it waits until
the study settles (``study_timeout_s``) and then runs with what is there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from dicom_node import waiting
from dicom_node.phases import PhaseResult
from dicom_node.rules import RoutingDecision, RuleSet
from inference.stacks import orientation_name


@dataclass
class SeriesPlan:
    """One complete series: its phase, what the rules decided, and its main stack."""

    series_uid: str
    study_uid: str
    phase: PhaseResult
    decision: RoutingDecision
    instance_count: int = 0
    image_kind: str = "ORIGINAL"
    orientation: str | None = None
    slice_spacing_mm: float | None = None
    incomplete: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    # The phase should also be read from the image and no evidence was asked for yet.
    image_missing: bool = False

    def describe(self) -> str:
        """E.g. ``1.2.3 (P 0.95, ORIGINAL axial, 2.5 mm, 120 images)``."""
        spacing = f"{self.slice_spacing_mm:g} mm" if self.slice_spacing_mm else "spacing ?"
        return (
            f"{self.series_uid} ({self.phase.phase} {self.phase.confidence:.2f}, "
            f"{self.image_kind} {self.orientation or '?'}, {spacing}, "
            f"{self.instance_count} images)"
        )


@dataclass
class PipelinePlan:
    pipeline: str
    inputs: dict[str, str] = field(default_factory=dict)  # role -> series UID
    fallback_roles: list[str] = field(default_factory=list)  # resolved by a later phase
    missing: dict[str, list[str]] = field(default_factory=dict)  # role -> phases wanted
    incomplete: dict[str, list[str]] = field(default_factory=dict)  # role -> why
    # role -> how the input was chosen (the candidates in order of preference)
    choices: dict[str, str] = field(default_factory=dict)
    wanted: dict[str, list[str]] = field(default_factory=dict)  # role -> phases it takes
    used_phases: dict[str, str] = field(default_factory=dict)  # role -> phase of its input
    arrived: set[str] = field(default_factory=set)  # phases of all the study's series
    study_timeout_s: float | None = None  # the rules' study_timeout_s

    @property
    def ready(self) -> bool:
        """Every input has a whole-looking series of its most preferred phase: run now."""
        return not self.missing and not self.fallback_roles and not self.incomplete

    @property
    def runnable(self) -> bool:
        """Every input has some acceptable series (maybe a fallback)."""
        return not self.missing

    def explain(self, settles_at: str | None = None) -> str:
        """What the pipeline does next, in words (``dicom_node.waiting``); ``settles_at``:
        when the study settles, as the reader's clock says it (None: not known)."""
        if self.ready:
            return f"{self.pipeline}: ready with {self.inputs}"
        if self.runnable:
            why = [
                waiting.fallback(role, self.wanted.get(role, []), self.used_phases.get(role, "?"))
                for role in self.fallback_roles
            ]
            for role, problems in self.incomplete.items():
                why.append(f"input {role} may be incomplete ({'; '.join(problems)})")
            told = waiting.runs_when_settled(why, settles_at, self.study_timeout_s)
            return f"{self.pipeline}: {told}"
        told = waiting.missing(
            self.pipeline, self.missing, self.arrived, settles_at, self.study_timeout_s
        )
        return f"{self.pipeline}: {told}"

    def not_run(self) -> str:
        """Why the pipeline did not run once the study settled (its inputs never came):
        ``ureter: not run: no delayed (D) series arrived before the study settled``."""
        return f"{self.pipeline}: not run: {waiting.never_came(self.missing)}"


def orientation(iop: Any) -> str | None:
    """axial / coronal / sagittal / oblique from ImageOrientationPatient (None if absent)."""
    try:
        values = [float(v) for v in iop]
    except (TypeError, ValueError):
        return None
    return orientation_name(values) if len(values) == 6 else None


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


def _float(value: Any) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


ImageLookup = Callable[[str], "dict[str, Any] | None"]


class NamedPipelines(Protocol):
    """Pipelines named for a whole study (a retrieve request,
    ``dicom_node.retrieve.NamedPipelines``), replacing the rules' choice."""

    pipelines: Sequence[str]

    def describe(self) -> str: ...


def plan_study(
    rules: RuleSet,
    study_series: dict[str, dict[str, Any]],
    target_spacing_mm: Callable[[str], float | None] | None = None,
    image: ImageLookup | None = None,
    named: NamedPipelines | None = None,
) -> tuple[dict[str, SeriesPlan], dict[str, PipelinePlan]]:
    """Classify, decide and resolve pipelines for the complete series of one study.

    ``study_series`` maps series UID -> attributes (``dicom_node.series_attrs``: the main
    stack's header plus derived values such as InstanceCount, Incomplete, CallingAE).
    ``target_spacing_mm(pipeline)`` is the slice spacing the pipeline's first model works
    at (None: unknown), used to prefer among candidates. ``image(series_uid)`` gives the
    image evidence of a series (see ``PhaseClassifier.classify_study``) or None when none
    was asked for yet; series that want it and have none are ``image_missing`` and wait,
    unknown, for it. Without ``image`` the phases come from the tags alone.
    ``named``: pipelines a retrieve request named for this study; every series the rules
    do not discard may feed them (still only through their input phases), and they
    replace the pipelines the rules chose (forwards and discards stay the rules').
    """
    phases = rules.classifier.classify_study(study_series)
    missing: set[str] = set()
    if image is not None:
        wanted = rules.classifier.wants_image(phases)
        evidence = {uid: image(uid) for uid in wanted}
        missing = {uid for uid, found in evidence.items() if found is None}
        if wanted:
            given = {
                uid: found if found is not None else {"state": "pending"}
                for uid, found in evidence.items()
            }
            phases = rules.classifier.classify_study(study_series, given)
    series_plans: dict[str, SeriesPlan] = {}
    requested: list[str] = []
    for uid, attrs in study_series.items():
        decision = rules.decide(series_attributes(attrs, phases[uid]))
        if named is not None and not decision.discard:
            decision.pipelines = [p for p in named.pipelines if p in rules.pipelines]
            decision.named_by = named.describe()
        series_plans[uid] = SeriesPlan(
            series_uid=uid,
            study_uid=str(attrs.get("StudyInstanceUID", "")),
            phase=phases[uid],
            decision=decision,
            instance_count=int(attrs.get("InstanceCount") or 0),
            image_kind=str(attrs.get("ImageKind") or "ORIGINAL"),
            orientation=attrs.get("Orientation"),
            slice_spacing_mm=_float(attrs.get("SliceSpacing")),
            incomplete=list(attrs.get("Incomplete") or []),
            left_out=list(attrs.get("LeftOut") or []),
            image_missing=uid in missing,
        )
        if not decision.discard:
            requested += [p for p in decision.pipelines if p not in requested]
    pipelines = {}
    for name in requested:
        # Only series a rule sent to this pipeline may feed it.
        candidates = [
            p
            for p in series_plans.values()
            if not p.decision.discard and name in p.decision.pipelines
        ]
        spacing = target_spacing_mm(name) if target_spacing_mm else None
        pipelines[name] = resolve_inputs(rules, name, candidates, spacing)
        pipelines[name].arrived = {p.phase.phase for p in series_plans.values()}
        pipelines[name].study_timeout_s = rules.spec.study_timeout_s
    return series_plans, pipelines


def preference(plan: SeriesPlan, target_spacing_mm: float | None) -> tuple[Any, ...]:
    """Sort key of a candidate input (smaller is better; see the module docstring)."""
    spacing = plan.slice_spacing_mm
    distance = abs(spacing - target_spacing_mm) if spacing and target_spacing_mm else 0.0
    return (
        plan.image_kind != "ORIGINAL",
        plan.orientation != "axial",
        bool(plan.incomplete),
        round(distance, 3),
        -plan.phase.confidence,
        -plan.instance_count,
        plan.series_uid,
    )


def resolve_inputs(
    rules: RuleSet,
    pipeline: str,
    candidates: list[SeriesPlan],
    target_spacing_mm: float | None = None,
) -> PipelinePlan:
    """Pick one series per input role: most preferred phase first, then ``preference``."""
    plan = PipelinePlan(pipeline)
    for role, wanted in rules.pipelines[pipeline].inputs.items():
        plan.wanted[role] = list(wanted)
        for rank, phase in enumerate(wanted):
            matches = sorted(
                (c for c in candidates if c.phase.phase == phase),
                key=lambda c: preference(c, target_spacing_mm),
            )
            if not matches:
                continue
            best = matches[0]
            plan.inputs[role] = best.series_uid
            plan.used_phases[role] = phase
            if rank > 0:
                plan.fallback_roles.append(role)
            if best.incomplete:
                plan.incomplete[role] = list(best.incomplete)
            others = "; ".join(c.describe() for c in matches[1:])
            plan.choices[role] = f"{best.describe()}" + (
                f", preferred over {others}" if others else ""
            )
            break
        else:
            plan.missing[role] = list(wanted)
    return plan
