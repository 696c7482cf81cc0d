"""CT contrast phase classification: A (arterial), P (portal venous), D (delayed), N (none).

Each series gets evidence from independent sources, each with a weight and a reason a
person can read:

- explicit phase rules from the rules file (first match decides; e.g. scouts -> never);
- keywords in SeriesDescription / ProtocolName (English and Korean, user-extensible);
- contrast agent tags (ContrastBolusAgent / ContrastBolusRoute present or absent);
- timing: seconds from ContrastBolusStartTime to AcquisitionTime against documented
  windows; without a bolus time, the gaps between the study's contrast series (a short
  gap is arterial -> portal venous, a long one portal venous -> delayed). The first
  contrast series is never assumed to be arterial: a single contrast series, or gaps that
  fit no pattern, give no timing vote;
- image evidence (``dicom_node.image_phase``): HU measured in the aorta, veins and kidneys
  by a coarse organ model, when the tags are weak (or always, as configured).

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
from dicom_node.image_phase import ImageEvidenceSettings, describe, phase_from_image
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
    # Without ContrastBolusStartTime: two contrast series at most this far apart are
    # arterial then portal venous; at least ``portal_to_delayed_min`` apart, portal venous
    # then delayed (nominal delays ~30-40 s, ~70 s and >= 180 s after injection).
    relative_gaps_s: dict[Literal["arterial_to_portal_max", "portal_to_delayed_min"], float] = (
        Field(
            default_factory=lambda: {"arterial_to_portal_max": 90.0, "portal_to_delayed_min": 120.0}
        )
    )
    weights: dict[Literal["rule", "keyword", "timing", "contrast_tags"], float] = Field(
        default_factory=lambda: {
            "rule": 10.0,
            "keyword": 3.0,
            "timing": 2.0,
            "contrast_tags": 1.0,
        }
    )
    min_confidence: float = Field(0.5, ge=0, le=1)
    # The winning phase needs at least this many votes: a keyword, a timing window or a
    # rule. Missing contrast tags or the series order alone never decide.
    min_score: float = Field(1.5, ge=0)
    rules: list[PhaseRule] = Field(default_factory=list)
    image_evidence: ImageEvidenceSettings = Field(default_factory=ImageEvidenceSettings)

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
    """A series' phase, the confidence (the winner's share of the votes) and the reasons.

    ``candidate`` is False for series that can have no phase (scouts, other modalities);
    ``waiting_for_image``: the phase stays unknown until the image evidence arrives.
    """

    phase: Phase
    confidence: float
    reasons: list[str] = field(default_factory=list)
    candidate: bool = True
    waiting_for_image: bool = False

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

    def classify_study(
        self,
        series_attrs: dict[str, dict[str, Any]],
        image: dict[str, dict[str, Any]] | None = None,
    ) -> dict[str, PhaseResult]:
        """Classify every series of one study; ``series_attrs``: series UID -> attributes.

        ``image``: series UID -> image evidence, ``{"state": "ready", "measurements":
        {...}}``, ``{"state": "pending"}`` (asked, not there yet: the phase stays unknown
        until it is) or ``{"state": "none", "reason": "..."}`` (could not be taken).
        """
        image = image or {}
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
                    "unknown", 1.0, [f"phase rule {decided.name!r}: no phase"], candidate=False
                )
                continue
            ok, why_not = is_phase_candidate(attrs)
            if not ok:
                results[uid] = PhaseResult(
                    "unknown", 1.0, [f"no phase: {why_not}"], candidate=False
                )
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
        waiting = self._image_votes(candidates, image, votes, reasons)
        for uid in candidates:
            results[uid] = self._decide(votes[uid], reasons[uid])
            if uid in waiting:
                results[uid] = PhaseResult(
                    "unknown",
                    results[uid].confidence,
                    [*results[uid].reasons, waiting[uid]],
                    waiting_for_image=True,
                )
        return results

    def wants_image(self, results: dict[str, PhaseResult]) -> list[str]:
        """Series whose phase should also be read from the image (``image_evidence.when``):
        CT image series only, never scouts or other modalities."""
        settings = self.settings.image_evidence
        if settings.when == "never" or not settings.model:
            return []
        wanted = []
        for uid, result in results.items():
            if not result.candidate:
                continue
            weak = result.phase == "unknown" or result.confidence < settings.weak_below
            if settings.when == "always" or weak:
                wanted.append(uid)
        return wanted

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
        weight = self.settings.weights["timing"]
        contrast = sorted(
            (t, uid)
            for uid, a in candidates.items()
            if _has_contrast_tags(a) and (t := _acquired_at(a)) is not None
        )
        boluses = [
            t for a in candidates.values() if (t := _seconds(a.get("ContrastBolusStartTime")))
        ]
        study_start = min(boluses) if boluses else (contrast[0][0] if contrast else None)
        for uid, attrs in candidates.items():
            acquired = _acquired_at(attrs)
            if acquired is None or _has_contrast_tags(attrs):
                continue
            if study_start is not None and acquired < study_start:
                votes[uid]["N"] += weight
                reasons[uid].append(
                    f"acquired {study_start - acquired:.0f} s before the study's contrast"
                )
        timed = set()
        for uid, attrs in candidates.items():
            acquired = _acquired_at(attrs)
            bolus = _seconds(attrs.get("ContrastBolusStartTime"))
            if acquired is None or bolus is None or not _has_contrast_tags(attrs):
                continue
            timed.add(uid)
            delay = acquired - bolus
            if delay < 0:
                delay += 24 * 3600  # acquisition after midnight
            for phase, (lo, hi) in self.settings.timing_windows_s.items():
                if delay >= lo and (hi is None or delay <= hi):
                    votes[uid][phase] += weight
                    hi_text = f"{hi:g}" if hi is not None else "..."
                    reasons[uid].append(
                        f"acquired {delay:.0f} s after ContrastBolusStartTime: "
                        f"{phase} window {lo:g}-{hi_text} s"
                    )
                    break
            else:
                reasons[uid].append(
                    f"acquired {delay:.0f} s after ContrastBolusStartTime: outside every window"
                )
        untimed = [(t, uid) for t, uid in contrast if uid not in timed]
        for uid, phase, why in self._gap_pattern(untimed):
            votes[uid][phase] += weight
            reasons[uid].append(why)

    def _gap_pattern(self, series: list[tuple[float, str]]) -> list[tuple[str, str, str]]:
        """Phases from the gaps between contrast series without a bolus time.

        Two series: a short gap is A then P, a long one P then D (the commonest two-phase
        protocols); three: A, P, D when the first gap is short and the second long. One
        series or gaps that fit no pattern: nothing (``unknown`` rather than a guess).
        """
        short = self.settings.relative_gaps_s["arterial_to_portal_max"]
        long = self.settings.relative_gaps_s["portal_to_delayed_min"]
        gaps = [b[0] - a[0] for a, b in zip(series, series[1:], strict=False)]
        pattern: tuple[str, ...] = ()
        if len(series) == 2:
            pattern = ("A", "P") if gaps[0] <= short else ("P", "D") if gaps[0] >= long else ()
        elif len(series) == 3 and gaps[0] <= short and gaps[1] >= long:
            pattern = ("A", "P", "D")
        if not pattern:
            return []
        gap_text = ", ".join(f"{g:.0f} s" for g in gaps)
        return [
            (
                uid,
                phase,
                f"contrast series {n + 1} of {len(series)} (gaps {gap_text}, no bolus time): "
                f"pattern {' -> '.join(pattern)}",
            )
            for n, ((_, uid), phase) in enumerate(zip(series, pattern, strict=True))
        ]

    def _image_votes(
        self,
        candidates: dict[str, dict[str, Any]],
        image: dict[str, dict[str, Any]],
        votes: dict[str, dict[str, float]],
        reasons: dict[str, list[str]],
    ) -> dict[str, str]:
        """Add the image's vote; returns uid -> reason for series still waiting for it."""
        settings = self.settings.image_evidence
        waiting: dict[str, str] = {}
        for uid in candidates:
            evidence = image.get(uid)
            if evidence is None:
                continue
            state = evidence.get("state")
            if state == "pending":
                waiting[uid] = f"waiting for image evidence (model {settings.model})"
            elif state == "none":
                reasons[uid].append(f"no image evidence ({evidence.get('reason', '?')})")
            elif state == "ready":
                measured = evidence.get("measurements") or {}
                phase, why = phase_from_image(measured, settings.thresholds)
                text = f"image ({measured.get('model', settings.model)}): {describe(measured)}"
                if phase is None:
                    reasons[uid].append(f"{text}: no phase ({why})")
                else:
                    votes[uid][phase] += settings.weight
                    reasons[uid].append(f"{text}: {phase} ({why})")
        return waiting

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
