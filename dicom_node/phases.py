"""CT contrast phase classification: A (arterial), P (portal venous), D (delayed), N (none).

Each series gets evidence from independent sources, each with a weight and a reason a
person can read:

- explicit phase rules from the rules file (first match decides; e.g. scouts -> never);
- keywords in SeriesDescription / ProtocolName (English and Korean, user-extensible);
- contrast agent tags (ContrastBolusAgent / ContrastBolusRoute present or absent);
- timing: seconds from ContrastBolusStartTime, or else from the study's first contrast
  acquisition, to AcquisitionTime, against documented windows;
- the order of the study's contrast series by AcquisitionTime (weak, used when the
  other sources say nothing).

Votes are summed per phase. Confidence is the winner's share of all votes, so evidence
that disagrees (text says arterial, timing says delayed) lowers it, and the conflict is
listed in the reasons; it is never silently resolved. Below ``min_confidence`` or with no
evidence the phase stays ``unknown``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, field_validator

from dicom_node.conditions import evaluate, validate_condition
from kernel.strict import StrictModel

Phase = Literal["A", "P", "D", "N", "unknown"]
PHASES = ("A", "P", "D", "N")
PHASE_NAMES = {"A": "arterial", "P": "portal venous", "D": "delayed", "N": "non-contrast"}
CT_IMAGE_STORAGE = {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1"}


class PhaseRule(StrictModel):
    """An explicit rule: when the condition matches, the phase is decided (or 'none')."""

    name: str
    when: dict[str, Any]
    phase: Literal["A", "P", "D", "N", "none"]

    @field_validator("when")
    @classmethod
    def _valid(cls, v: dict[str, Any]) -> dict[str, Any]:
        validate_condition(v)
        return v


class PhaseSettings(StrictModel):
    """The ``phases:`` section of routing_rules.yaml."""

    keywords: dict[Literal["A", "P", "D", "N"], list[str]] = Field(default_factory=dict)
    timing_windows_s: dict[Literal["A", "P", "D"], tuple[float, float | None]] = Field(
        default_factory=lambda: {"A": (15, 45), "P": (50, 100), "D": (180, None)}
    )
    weights: dict[str, float] = Field(
        default_factory=lambda: {
            "rule": 10.0,
            "keyword": 3.0,
            "timing": 2.0,
            "contrast_tags": 1.0,
            "order": 0.5,
        }
    )
    min_confidence: float = Field(0.5, ge=0, le=1)
    # The winning phase needs at least this many votes: a keyword, a timing window or a
    # rule. Missing contrast tags or the series order alone never decide.
    min_score: float = Field(1.5, ge=0)
    rules: list[PhaseRule] = Field(default_factory=list)

    @field_validator("keywords")
    @classmethod
    def _regexes(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for phase, patterns in v.items():
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(f"keywords.{phase}: bad regex {pattern!r}: {exc}") from None
        return v


@dataclass
class PhaseResult:
    phase: Phase
    confidence: float
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "confidence": self.confidence, "reasons": self.reasons}


def _seconds(value: Any) -> float | None:
    """DICOM TM (HHMMSS.frac, also HH:MM:SS) to seconds since midnight."""
    if value in (None, ""):
        return None
    text = str(value).strip().replace(":", "")
    m = re.match(r"^(\d{2})(\d{2})?(\d{2})?(\.\d+)?$", text)
    if not m:
        return None
    hours, minutes, secs = (int(g) if g else 0 for g in m.groups()[:3])
    return hours * 3600 + minutes * 60 + secs + float(m.group(4) or 0)


def _acquired_at(attrs: dict[str, Any]) -> float | None:
    for key in ("AcquisitionTime", "ContentTime", "SeriesTime"):
        t = _seconds(attrs.get(key))
        if t is not None:
            return t
    return None


def _has_contrast_tags(attrs: dict[str, Any]) -> bool:
    return any(attrs.get(k) not in (None, "") for k in ("ContrastBolusAgent", "ContrastBolusRoute"))


def is_phase_candidate(attrs: dict[str, Any]) -> tuple[bool, str]:
    """Only axial-ish CT images can have a contrast phase; scouts, SRs, other modalities not."""
    if str(attrs.get("Modality", "")).upper() != "CT":
        return False, f"modality {attrs.get('Modality')!r} is not CT"
    sop_class = str(attrs.get("SOPClassUID", ""))
    if sop_class and sop_class not in CT_IMAGE_STORAGE:
        return False, f"SOP class {sop_class} is not a CT image"
    image_type = attrs.get("ImageType") or []
    image_type = [
        str(v).upper() for v in (image_type if isinstance(image_type, list) else [image_type])
    ]
    if "LOCALIZER" in image_type:
        return False, "ImageType says LOCALIZER (scout)"
    return True, ""


class PhaseClassifier:
    def __init__(self, settings: PhaseSettings) -> None:
        self.settings = settings
        self._keywords = {
            phase: [re.compile(p, re.IGNORECASE) for p in patterns]
            for phase, patterns in settings.keywords.items()
        }

    def classify_study(self, series_attrs: dict[str, dict[str, Any]]) -> dict[str, PhaseResult]:
        """Classify every series of one study; ``series_attrs``: series UID -> attributes."""
        results: dict[str, PhaseResult] = {}
        votes: dict[str, dict[str, float]] = {}
        reasons: dict[str, list[str]] = {}
        candidates: dict[str, dict[str, Any]] = {}
        for uid, attrs in series_attrs.items():
            decided = None
            for rule in self.settings.rules:
                ok, why = evaluate(rule.when, attrs)
                if ok:
                    decided = rule
                    break
            if decided is not None and decided.phase == "none":
                results[uid] = PhaseResult(
                    "unknown", 1.0, [f"phase rule {decided.name!r}: no phase"]
                )
                continue
            ok, why_not = is_phase_candidate(attrs)
            if not ok:
                results[uid] = PhaseResult("unknown", 1.0, [f"no phase: {why_not}"])
                continue
            candidates[uid] = attrs
            votes[uid] = defaultdict(float)
            reasons[uid] = []
            if decided is not None:
                votes[uid][decided.phase] += self.settings.weights["rule"]
                reasons[uid].append(f"phase rule {decided.name!r} says {decided.phase}")
            self._text_votes(attrs, votes[uid], reasons[uid])
            self._contrast_votes(attrs, votes[uid], reasons[uid])
        self._timing_votes(candidates, votes, reasons)
        self._order_votes(candidates, votes, reasons)
        for uid in candidates:
            results[uid] = self._decide(votes[uid], reasons[uid])
        return results

    # -- evidence ------------------------------------------------------------------------
    def _text_votes(self, attrs: dict[str, Any], votes: dict[str, float], why: list[str]) -> None:
        text = " | ".join(
            str(attrs.get(k)) for k in ("SeriesDescription", "ProtocolName") if attrs.get(k)
        )
        if not text:
            why.append("no SeriesDescription / ProtocolName")
            return
        for phase, patterns in self._keywords.items():
            for pattern in patterns:
                m = pattern.search(text)
                if m:
                    votes[phase] += self.settings.weights["keyword"]
                    why.append(f"description {text!r} contains {m.group(0)!r} ({phase})")
                    break

    def _contrast_votes(
        self, attrs: dict[str, Any], votes: dict[str, float], why: list[str]
    ) -> None:
        weight = self.settings.weights["contrast_tags"]
        if _has_contrast_tags(attrs):
            why.append(f"ContrastBolusAgent {attrs.get('ContrastBolusAgent')!r}: contrast given")
            for phase in ("A", "P", "D"):
                votes[phase] += weight / 3
        else:
            votes["N"] += weight
            why.append("no ContrastBolusAgent / ContrastBolusRoute")

    def _timing_votes(
        self,
        candidates: dict[str, dict[str, Any]],
        votes: dict[str, dict[str, float]],
        reasons: dict[str, list[str]],
    ) -> None:
        contrast_times = [
            t for a in candidates.values() if _has_contrast_tags(a) and (t := _acquired_at(a))
        ]
        first_contrast = min(contrast_times) if contrast_times else None
        boluses = [
            t for a in candidates.values() if (t := _seconds(a.get("ContrastBolusStartTime")))
        ]
        study_bolus = min(boluses) if boluses else first_contrast
        for uid, attrs in candidates.items():
            acquired = _acquired_at(attrs)
            bolus = _seconds(attrs.get("ContrastBolusStartTime"))
            if acquired is None:
                continue
            if not _has_contrast_tags(attrs):
                if study_bolus is not None and acquired < study_bolus:
                    votes[uid]["N"] += self.settings.weights["timing"]
                    reasons[uid].append(
                        f"acquired {study_bolus - acquired:.0f} s before the study's contrast bolus"
                    )
                continue
            if bolus is not None:
                delay, since = acquired - bolus, "ContrastBolusStartTime"
            elif first_contrast is not None and len(contrast_times) > 1:
                # Relative to the first contrast series: assume it was arterial (~30 s).
                delay, since = acquired - first_contrast + 30.0, "first contrast series (+30 s)"
            else:
                continue
            if delay < 0:
                delay += 24 * 3600  # acquisition after midnight
            for phase, (lo, hi) in self.settings.timing_windows_s.items():
                if delay >= lo and (hi is None or delay <= hi):
                    votes[uid][phase] += self.settings.weights["timing"]
                    hi_text = f"{hi:g}" if hi is not None else "..."
                    reasons[uid].append(
                        f"acquired {delay:.0f} s after {since}: {phase} window {lo:g}-{hi_text} s"
                    )
                    break
            else:
                reasons[uid].append(f"acquired {delay:.0f} s after {since}: outside every window")

    def _order_votes(
        self,
        candidates: dict[str, dict[str, Any]],
        votes: dict[str, dict[str, float]],
        reasons: dict[str, list[str]],
    ) -> None:
        """With 2-3 contrast series and nothing better, earlier means A, then P, then D."""
        timed = sorted(
            (t, uid)
            for uid, a in candidates.items()
            if _has_contrast_tags(a) and (t := _acquired_at(a)) is not None
        )
        if not 2 <= len(timed) <= 3:
            return
        order = ("A", "P", "D") if len(timed) == 3 else ("A", "P")
        for (_, uid), phase in zip(timed, order, strict=True):
            if votes[uid] and max(votes[uid].values()) > self.settings.weights["contrast_tags"]:
                continue  # stronger evidence exists: order is only a tie-breaker
            votes[uid][phase] += self.settings.weights["order"]
            reasons[uid].append(
                f"contrast series #{order.index(phase) + 1} of {len(timed)} by AcquisitionTime"
            )

    def _decide(self, votes: dict[str, float], why: list[str]) -> PhaseResult:
        total = sum(votes.values())
        if total <= 0:
            return PhaseResult("unknown", 0.0, [*why, "no evidence for any phase"])
        ranked = sorted(votes.items(), key=lambda kv: kv[1], reverse=True)
        phase, score = ranked[0]
        confidence = round(score / total, 3)
        strong = [p for p, v in ranked if v >= 1.5]  # a keyword or a timing window
        if len(strong) > 1:
            why.append(
                "conflict: evidence for "
                + " and ".join(f"{p} ({votes[p]:g})" for p in strong)
                + "; confidence lowered"
            )
        if len(ranked) > 1 and ranked[1][1] == score:
            return PhaseResult(
                "unknown", confidence, [*why, f"tie between {phase} and {ranked[1][0]}"]
            )
        if confidence < self.settings.min_confidence or score < self.settings.min_score:
            return PhaseResult(
                "unknown",
                confidence,
                [*why, f"best guess {phase} at {confidence:.2f} is too weak to decide"],
            )
        return PhaseResult(phase, confidence, why)  # type: ignore[arg-type]
