"""The routing rules language (``routing_rules.yaml``): schema, loading and matching.

A rule has a name, a ``when`` condition on the series' DICOM attributes and actions
(``pipelines`` to run, ``forward`` destinations, ``discard``). Conditions map a DICOM
keyword (or a derived value such as ``InstanceCount`` or ``CallingAE``) to a matcher:

- a scalar: equals (text compares case-insensitively, surrounding spaces ignored)
- a list: one of the values
- ``{equals: x}``, ``{one_of: [..]}``, ``{regex: '...'}`` (case-insensitive search),
  ``{range: {min: a, max: b}}`` (numeric, inclusive), ``{exists: true|false}``
- ``all: [..]``, ``any: [..]``, ``not: {..}`` combine conditions.

Rules are evaluated in order; a rule with ``stop: true`` ends the evaluation when it
matches (first-match), otherwise every matching rule contributes (all-match).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dicom_node.phases import PhaseClassifier, PhaseSettings

_COMBINATORS = ("all", "any", "not")
_MATCHER_KEYS = {"equals", "one_of", "regex", "range", "exists"}


class RulesError(ValueError):
    """The rules file is invalid; the message names the rule / line and the reason."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


PhaseCode = Literal["A", "P", "D", "N"]


class CropSpec(_Strict):
    """Run the pipeline's models only inside another model's labels (plus a margin)."""

    to_model: str  # a registry model; its output on the reference input is reused
    labels: list[str] = Field(min_length=1)  # that model's label names
    margin_mm: float = Field(20.0, ge=0)


class PipelineSpec(_Strict):
    models: list[str] = Field(min_length=1, description="Model ids from the model registry.")
    crop: CropSpec | None = None
    masks: Literal["nifti"] | None = None  # also write a NIfTI label map per study
    description: str = ""
    priority: Literal["urgent", "normal"] = "normal"
    # Input role -> acceptable phases, most preferred first. A pipeline fires as soon as
    # every role has a complete series of its first phase; with only fallback phases it
    # waits until the study has been quiet for study_timeout_s.
    inputs: dict[str, list[PhaseCode]] = Field(
        default_factory=lambda: {"image": ["P", "A", "D"]}, min_length=1
    )

    @field_validator("inputs")
    @classmethod
    def _non_empty(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for role, phases in v.items():
            if not phases:
                raise ValueError(f"input {role!r} needs at least one phase")
        return v


class Rule(_Strict):
    name: str
    description: str = ""
    when: dict[str, Any] = Field(default_factory=dict)
    pipelines: list[str] = Field(default_factory=list)
    forward: list[str] = Field(default_factory=list)
    discard: bool = False
    priority: Literal["urgent", "normal"] | None = None
    stop: bool = False

    @field_validator("when")
    @classmethod
    def _valid_condition(cls, v: dict[str, Any]) -> dict[str, Any]:
        validate_condition(v)
        return v


class RulesFile(_Strict):
    version: Literal[1] = 1
    # A study counts as settled when no instance arrived for this long: pipelines then run
    # on fallback phases, or the study records why they could not run.
    study_timeout_s: float = Field(600.0, gt=0)
    phases: PhaseSettings = Field(default_factory=PhaseSettings)
    pipelines: dict[str, PipelineSpec] = Field(default_factory=dict)
    rules: list[Rule] = Field(default_factory=list)


def validate_condition(cond: Any, where: str = "when") -> None:
    if not isinstance(cond, dict):
        raise ValueError(f"{where}: a condition must be a mapping, got {cond!r}")
    for key, value in cond.items():
        if key in ("all", "any"):
            if not isinstance(value, list):
                raise ValueError(f"{where}.{key}: expected a list of conditions")
            for i, sub in enumerate(value):
                validate_condition(sub, f"{where}.{key}[{i}]")
        elif key == "not":
            validate_condition(value, f"{where}.not")
        elif isinstance(value, dict):
            unknown = set(value) - _MATCHER_KEYS
            if unknown or len(value) != 1:
                raise ValueError(
                    f"{where}.{key}: use exactly one of {sorted(_MATCHER_KEYS)}, "
                    f"got {sorted(value)}"
                )
            if "regex" in value:
                try:
                    re.compile(str(value["regex"]))
                except re.error as exc:
                    raise ValueError(
                        f"{where}.{key}: bad regex {value['regex']!r}: {exc}"
                    ) from None
            if "range" in value and not (
                isinstance(value["range"], dict) and set(value["range"]) <= {"min", "max"}
            ):
                raise ValueError(f"{where}.{key}: range takes {{min: .., max: ..}}")


def _norm(value: Any) -> Any:
    return value.strip().casefold() if isinstance(value, str) else value


def _equals(actual: Any, expected: Any) -> bool:
    if isinstance(actual, list | tuple):  # multi-valued attribute: any value matches
        return any(_equals(a, expected) for a in actual)
    if isinstance(expected, int | float) and not isinstance(expected, bool):
        try:
            return float(actual) == float(expected)
        except (TypeError, ValueError):
            return False
    return _norm(str(actual) if actual is not None else None) == _norm(str(expected))


def _match_value(actual: Any, matcher: Any) -> tuple[bool, str]:
    if isinstance(matcher, dict):
        op, arg = next(iter(matcher.items()))
        if op == "exists":
            present = actual not in (None, "", [])
            return present == bool(arg), f"{'present' if present else 'missing'}"
        if actual in (None, ""):
            return False, "missing"
        if op == "equals":
            return _equals(actual, arg), f"{actual!r}"
        if op == "one_of":
            return any(_equals(actual, a) for a in arg), f"{actual!r}"
        if op == "regex":
            text = "\\".join(map(str, actual)) if isinstance(actual, list | tuple) else str(actual)
            return re.search(str(arg), text, re.IGNORECASE) is not None, f"{text!r}"
        if op == "range":
            try:
                number = float(actual)
            except (TypeError, ValueError):
                return False, f"{actual!r} is not a number"
            ok = ("min" not in arg or number >= float(arg["min"])) and (
                "max" not in arg or number <= float(arg["max"])
            )
            return ok, f"{number:g}"
    if isinstance(matcher, list):
        return any(_equals(actual, m) for m in matcher), f"{actual!r}"
    return _equals(actual, matcher), f"{actual!r}"


def evaluate(cond: dict[str, Any], attrs: dict[str, Any]) -> tuple[bool, list[str]]:
    """Evaluate a condition; returns (matched, reasons) with one reason per test."""
    reasons: list[str] = []
    for key, value in cond.items():
        if key == "all":
            results = [evaluate(sub, attrs) for sub in value]
            ok = all(r[0] for r in results)
            reasons += [r for res in results for r in res[1]]
        elif key == "any":
            results = [evaluate(sub, attrs) for sub in value]
            ok = any(r[0] for r in results)
            reasons += [r for res in results if res[0] == ok for r in res[1]][:3]
        elif key == "not":
            inner, why = evaluate(value, attrs)
            ok = not inner
            reasons.append(f"not ({'; '.join(why)})")
        else:
            ok, seen = _match_value(attrs.get(key), value)
            reasons.append(f"{key} {seen} {'matches' if ok else 'does not match'} {value!r}")
        if not ok:
            return False, reasons
    return True, reasons


@dataclass
class RoutingDecision:
    matched_rules: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    pipelines: list[str] = field(default_factory=list)
    forward: list[str] = field(default_factory=list)
    discard: bool = False
    priority: str = "normal"


class RuleSet:
    def __init__(self, spec: RulesFile, source: Path | None = None) -> None:
        self.spec = spec
        self.source = source
        self.classifier = PhaseClassifier(spec.phases)

    @property
    def pipelines(self) -> dict[str, PipelineSpec]:
        return self.spec.pipelines

    def decide(self, attrs: dict[str, Any]) -> RoutingDecision:
        decision = RoutingDecision()
        for rule in self.spec.rules:
            ok, why = evaluate(rule.when, attrs)
            if not ok:
                continue
            decision.matched_rules.append(rule.name)
            decision.reasons.append(f"rule {rule.name!r} matched: " + "; ".join(why))
            for name in rule.pipelines:
                if name not in decision.pipelines:
                    decision.pipelines.append(name)
            for dest in rule.forward:
                if dest not in decision.forward:
                    decision.forward.append(dest)
            decision.discard = decision.discard or rule.discard
            if rule.priority == "urgent":
                decision.priority = "urgent"
            if rule.stop:
                break
        return decision


def _line_of(text: str, loc: tuple[Any, ...]) -> str:
    """Best-effort 'line N' for an error location such as ('rules', 2, 'when')."""
    if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
        starts = [m.start() for m in re.finditer(r"(?m)^\s*-\s+name\s*:", text)]
        if loc[1] < len(starts):
            return f"line {text.count(chr(10), 0, starts[loc[1]]) + 1}: "
    if loc and isinstance(loc[0], str):
        m = re.search(rf"(?m)^{re.escape(loc[0])}\s*:", text)
        if m:
            return f"line {text.count(chr(10), 0, m.start()) + 1}: "
    return ""


def parse_rules(
    text: str,
    source: str = "<rules>",
    known_destinations: set[str] | None = None,
    known_models: set[str] | None = None,
) -> RuleSet:
    """Parse and validate a rules document; raises RulesError naming line and reason."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise RulesError(f"{source}: {where}not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RulesError(f"{source}: the rules file must be a mapping")
    try:
        spec = RulesFile(**raw)
    except ValidationError as exc:
        lines = []
        for e in exc.errors():
            loc = tuple(e["loc"])
            lines.append(
                f"{source}: {_line_of(text, loc)}{'.'.join(map(str, loc))}: "
                f"{e['msg'].removeprefix('Value error, ')}"
            )
        raise RulesError("\n".join(lines)) from None
    problems = []
    for i, rule in enumerate(spec.rules):
        where = f"{source}: {_line_of(text, ('rules', i))}rule {rule.name!r}"
        for p in rule.pipelines:
            if p not in spec.pipelines:
                problems.append(f"{where}: unknown pipeline {p!r}")
        if known_destinations is not None:
            for d in rule.forward:
                if d not in known_destinations:
                    problems.append(f"{where}: unknown destination {d!r}")
    if known_models is not None:
        for name, pipe in spec.pipelines.items():
            if pipe.crop is not None and pipe.crop.to_model not in known_models:
                problems.append(
                    f"{source}: pipeline {name!r}: crop model {pipe.crop.to_model!r} is unknown"
                )
            for m in pipe.models:
                if m not in known_models:
                    problems.append(f"{source}: pipeline {name!r}: unknown model {m!r}")
                elif isinstance(known_models, dict):
                    missing = [c for c in known_models[m] if c not in pipe.inputs]
                    if missing:
                        problems.append(
                            f"{source}: pipeline {name!r}: model {m!r} reads inputs {missing} "
                            f"that the pipeline does not declare (inputs: {sorted(pipe.inputs)})"
                        )
    if problems:
        raise RulesError("\n".join(problems))
    return RuleSet(spec, Path(source))


def load_rules(path: Path, **known: Any) -> RuleSet:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise RulesError(f"rules file {path} cannot be read: {exc}") from None
    return parse_rules(text, str(path), **known)
