"""The words for a pipeline that waits for its input series, and for one that never ran.

One place, so the study pages (``dicom_node.status``), ``dicom-node route explain`` and
the ``pipeline_not_run`` event (``dicom_node.planning``) say the same thing: which series
is missing by its phase's name (``an arterial (A) series``), whether one of that phase
arrived but no rule sends it to the pipeline, and when the wait ends: the study settles
``study_timeout_s`` after its last instance, and then the pipeline runs with what is there
(a fallback phase, a series that may be incomplete) or does not run at all.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from kernel.vocabulary import PHASE_NAMES, Phase


def phase_words(phase: str) -> str:
    """``arterial (A)``; a phase without a name is given as it is."""
    try:
        return f"{PHASE_NAMES[Phase(phase)]} ({phase})"
    except (ValueError, KeyError):
        return phase


def _a(words: str) -> str:
    return f"{'an' if words[:1].lower() in 'aeiou' else 'a'} {words}"


def _phases(phases: Sequence[str]) -> str:
    return " or ".join(phase_words(p) for p in phases)


def series_of(phases: Sequence[str]) -> str:
    """``an arterial (A) series``, ``a portal venous (P) or arterial (A) series``."""
    return _a(f"{_phases(phases)} series")


def _settles(settles_at: str | None, timeout_s: float | None) -> str:
    """`` at 14:03:12 (study_timeout_s 600 s)``, or what is known of it."""
    at = f" at {settles_at}" if settles_at else ""
    if timeout_s is not None:
        after = "" if settles_at else " after its last instance"
        return f"{at} (study_timeout_s {timeout_s:g} s{after})"
    return at


def missing(
    pipeline: str,
    wanted: Mapping[str, Sequence[str]],
    arrived: Collection[str] = (),
    settles_at: str | None = None,
    timeout_s: float | None = None,
) -> str:
    """Why ``pipeline`` waits for the roles in ``wanted`` (role -> phases it takes, most
    preferred first), none of which has a series yet. ``arrived``: phases of the study's
    series (also those no rule sends to the pipeline); ``settles_at``: when the study
    settles, as the reader's clock says it; ``timeout_s``: ``study_timeout_s``.

    ``waiting for an arterial (A) series; none received yet; if none arrives it does not
    run when the study settles at 14:03:12 (study_timeout_s 600 s)``.
    """
    needed = " and ".join(series_of(p) for p in wanted.values())
    none = [phases for phases in wanted.values() if not any(p in arrived for p in phases)]
    unfed = sorted({p for phases in wanted.values() for p in phases if p in arrived})
    states = []
    if len(none) == len(wanted):
        states.append("none received yet")
    elif none:
        states.append(" and ".join(f"no {_phases(p)} series" for p in none) + " received yet")
    if unfed:
        got = " and ".join(phase_words(p) for p in unfed)
        states.append(f"{_a(got)} series arrived but no rule sends it to {pipeline}")
    state = "; ".join(states)
    one = "none arrives" if len(wanted) == 1 else "they do not all arrive"
    return (
        f"waiting for {needed}; {state}; if {one} it does not run when the study settles"
        + _settles(settles_at, timeout_s)
    )


def never_came(wanted: Mapping[str, Sequence[str]]) -> str:
    """Why a pipeline did not run once the study settled: ``no delayed (D) series arrived
    before the study settled``."""
    needed = " and ".join(f"no {_phases(p)} series" for p in wanted.values())
    return f"{needed} arrived before the study settled"


def runs_when_settled(
    why: Sequence[str], settles_at: str | None = None, timeout_s: float | None = None
) -> str:
    """A pipeline with an input for every role that still waits (``why``: a fallback
    phase, an input that may be incomplete): ``...; runs with what is there when the
    study settles at 14:03:12 (study_timeout_s 600 s)``."""
    return "; ".join(
        [*why, "runs with what is there when the study settles" + _settles(settles_at, timeout_s)]
    )


def fallback(role: str, phases: Sequence[str], used: str) -> str:
    """``image: no portal venous (P) series yet, only an arterial (A) one``."""
    return f"{role}: no {_phases(phases[:1])} series yet, only {_a(phase_words(used))} one"
