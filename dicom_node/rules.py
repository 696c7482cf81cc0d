"""The routing rules language (``routing_rules.yaml``): schema, loading and matching.

A rule has a name, a ``when`` condition on the series' DICOM attributes (the language is
``dicom_node.conditions``) and actions (``pipelines`` to run, ``forward`` destinations,
``discard``, ``priority``). The ``pipelines`` section is the pipeline catalog
(``kernel.catalog``), which workers read on their own.

Rules are evaluated in order; a rule with ``stop: true`` ends the evaluation when it
matches (first-match), otherwise every matching rule contributes (all-match).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from dicom_node.conditions import evaluate, first_failure, validate_condition
from dicom_node.phases import PhaseClassifier, PhaseSettings
from kernel.catalog import PipelineSpec, check_against_models
from kernel.strict import StrictModel
from kernel.vocabulary import Priority


class RulesError(ValueError):
    """The rules file is invalid; the message names the rule / line and the reason."""


class Rule(StrictModel):
    """One routing rule: a condition on a completed series and what to do with it."""

    name: str
    description: str = ""
    when: dict[str, Any] = Field(default_factory=dict)
    pipelines: list[str] = Field(default_factory=list)
    forward: list[str] = Field(default_factory=list)
    discard: bool = False
    priority: Priority | None = None
    stop: bool = False

    @field_validator("when")
    @classmethod
    def _valid_condition(cls, v: dict[str, Any]) -> dict[str, Any]:
        validate_condition(v)
        return v


class RulesFile(StrictModel):
    """The whole rules file: phases, the pipeline catalog and the routing rules."""

    version: Literal[1] = 1
    # A study counts as settled when no instance arrived for this long: pipelines then run
    # on fallback phases, or the study records why they could not run.
    study_timeout_s: float = Field(600.0, gt=0)
    phases: PhaseSettings = Field(default_factory=PhaseSettings)
    pipelines: dict[str, PipelineSpec] = Field(default_factory=dict)
    rules: list[Rule] = Field(default_factory=list)


@dataclass
class RoutingDecision:
    """What the rules decided for one series, with one reason per matched rule.

    ``rule_failures``: (rule name, its first failing condition) for each rule evaluated
    that did not match; ``not_matched`` the same as text
    (``contrast-ct-kidney: Orientation coronal is not axial``).
    """

    matched_rules: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    pipelines: list[str] = field(default_factory=list)
    forward: list[str] = field(default_factory=list)
    discard: bool = False
    priority: str = "normal"
    rule_failures: list[tuple[str, str]] = field(default_factory=list)
    # Set when a retrieve request named the pipelines of this study (they replace the
    # rules' choice): the words the routing event starts with.
    named_by: str | None = None

    @property
    def not_matched(self) -> list[str]:
        return [f"{rule}: {failure}" for rule, failure in self.rule_failures]

    def summary(self) -> str:
        """One line for the event log: the matched rules' reasons, or why none matched
        (after the retrieve request that named the pipelines, if one did)."""
        if self.named_by:
            return f"{self.named_by}; {self._rules_summary()}"
        return self._rules_summary()

    def _rules_summary(self) -> str:
        if self.matched_rules:
            return "; ".join(self.reasons)
        if not self.not_matched:
            return "no rule matched: the rules file has no rules"
        return "no rule matched: " + "; ".join(self.not_matched)


class RuleSet:
    """A validated rules file: the phase classifier, the pipelines and the rules.

    ``decide(attrs)`` applies the rules to one series' attributes (DICOM keywords plus
    the derived values described in the module docstring).
    """

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
                failure = first_failure(rule.when, attrs) or "; ".join(why)
                decision.rule_failures.append((rule.name, failure))
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
            if rule.priority == Priority.URGENT:
                decision.priority = Priority.URGENT
            if rule.stop:
                break
        return decision


def _line_of(text: str, loc: tuple[Any, ...]) -> str:
    """'line N: ' of the deepest YAML node on an error location such as
    ('rules', 2, 'when') or ('pipelines', 'tumor', 'models'); '' when not found.

    Walks the composed YAML tree, so a key that also occurs elsewhere (a phase rule's
    ``name`` before the routing rules) is never taken for the one meant.
    """
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return ""
    found = None  # the node to point at: a key's own line for mapping keys
    for part in loc:
        child = line_node = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                    child, line_node = value, key
                    break
        elif (
            isinstance(node, yaml.SequenceNode)
            and isinstance(part, int)
            and 0 <= part < len(node.value)
        ):
            child = line_node = node.value[part]
        if child is None:
            break
        node, found = child, line_node
    if found is None:
        return ""
    return f"line {found.start_mark.line + 1}: "


def parse_rules(
    text: str,
    source: str = "<rules>",
    known_destinations: set[str] | None = None,
    known_models: dict[str, list[str]] | None = None,
    webhook_allowed_hosts: list[str] | None = None,
) -> RuleSet:
    """Parse and validate a rules document; raises RulesError naming line and reason.

    ``known_destinations`` (destination names) and ``known_models`` (model id -> the
    input roles it reads) check forwards and pipelines against the node's settings and
    registry; ``webhook_allowed_hosts`` (``webhooks.allowed_hosts``) the hosts of the
    pipelines' ``update_url`` (``kernel.webhooks.check_url``; None: not checked).
    """
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise RulesError(f"{source}: {where}not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RulesError(f"{source}: the rules file must be a mapping")
    try:
        context = {"webhook_allowed_hosts": webhook_allowed_hosts}
        spec = RulesFile.model_validate(raw, context=context)
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

        def where(key: str, i: int = i, rule: Rule = rule) -> str:
            return f"{source}: {_line_of(text, ('rules', i, key))}rule {rule.name!r}"

        for p in rule.pipelines:
            if p not in spec.pipelines:
                problems.append(f"{where('pipelines')}: unknown pipeline {p!r}")
        if known_destinations is not None:
            for d in rule.forward:
                if d not in known_destinations:
                    problems.append(f"{where('forward')}: unknown destination {d!r}")
    if known_models is not None:
        problems += check_against_models(spec.pipelines, known_models, source)
        evidence = spec.phases.image_evidence
        if evidence.when != "never" and evidence.model and evidence.model not in known_models:
            problems.append(
                f"{source}: phases.image_evidence: model {evidence.model!r} is not in the "
                "model registry (set when: never to do without image evidence)"
            )
    if problems:
        raise RulesError("\n".join(problems))
    return RuleSet(spec, Path(source))


def load_rules(path: Path, **known: Any) -> RuleSet:
    """``parse_rules`` of the file at ``path``; RulesError when it cannot be read."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise RulesError(f"rules file {path} cannot be read: {exc}") from None
    return parse_rules(text, str(path), **known)
