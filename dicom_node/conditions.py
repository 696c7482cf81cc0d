"""The condition language of the rules file, shared by routing rules and phase rules.

A condition maps a DICOM keyword (or a derived value such as ``InstanceCount`` or
``CallingAE``) to a matcher:

- a scalar: equals (text compares case-insensitively, surrounding spaces ignored)
- a list: one of the values
- ``{equals: x}``, ``{one_of: [..]}``, ``{regex: '...'}`` (case-insensitive search),
  ``{range: {min: a, max: b}}`` (numeric, inclusive), ``{exists: true|false}``
- ``all: [..]``, ``any: [..]``, ``not: {..}`` combine conditions.
"""

from __future__ import annotations

import re
from typing import Any

_MATCHER_KEYS = {"equals", "one_of", "regex", "range", "exists"}


def validate_condition(cond: Any, where: str = "when") -> None:
    """Raise ``ValueError`` naming the place (``when.all[1].Modality``) of a bad condition."""
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


def _shown(value: Any) -> str:
    """A value as an administrator reads it: text without quotes, lists joined by ``\\``
    (as DICOM writes multi-valued attributes), numbers without trailing zeros."""
    if isinstance(value, list | tuple):
        return "\\".join(_shown(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).strip()


def _expected(matcher: Any) -> str:
    """What a matcher wants, in words: ``axial``, ``one of A, P, D``, ``in 1..3``."""
    if isinstance(matcher, list):
        return "one of " + ", ".join(_shown(m) for m in matcher)
    if isinstance(matcher, dict):
        op, arg = next(iter(matcher.items()))
        if op == "equals":
            return _shown(arg)
        if op == "one_of":
            return "one of " + ", ".join(_shown(m) for m in arg)
        if op == "regex":
            return f"matching /{arg}/"
        if op == "range":
            low, high = arg.get("min"), arg.get("max")
            if low is not None and high is not None:
                return f"in {_shown(low)}..{_shown(high)}"
            return f">= {_shown(low)}" if low is not None else f"<= {_shown(high)}"
        if op == "exists":
            return "present" if arg else "absent"
    return _shown(matcher)


def first_failure(cond: dict[str, Any], attrs: dict[str, Any]) -> str | None:
    """Why ``cond`` does not hold for ``attrs``, in one phrase; None when it holds.

    The first failing test in the order ``evaluate`` checks them, e.g.
    ``Orientation coronal is not axial``, ``Phase unknown is not one of A, P, D``,
    ``ContrastBolusAgent is missing``; ``any`` lists each alternative's failure.
    """
    for key, value in cond.items():
        if key == "all":
            for sub in value:
                why = first_failure(sub, attrs)
                if why is not None:
                    return why
        elif key == "any":
            whys = [first_failure(sub, attrs) for sub in value]
            if all(w is not None for w in whys):
                return "none of: " + "; ".join(w for w in whys if w)
        elif key == "not":
            inner, why = evaluate(value, attrs)
            if inner:
                return "excluded by not: " + "; ".join(why)
        else:
            ok, _seen = _match_value(attrs.get(key), value)
            if ok:
                continue
            actual = attrs.get(key)
            if isinstance(value, dict) and "exists" in value:
                return f"{key} is {'present' if actual not in (None, '', []) else 'missing'}"
            if actual in (None, "", []):
                return f"{key} is missing (wanted {_expected(value)})"
            if isinstance(value, dict) and "regex" in value:
                return f"{key} {_shown(actual)} does not match /{value['regex']}/"
            if isinstance(value, dict) and "range" in value:
                return f"{key} {_shown(actual)} is not {_expected(value)}"
            return f"{key} {_shown(actual)} is not {_expected(value)}"
    return None


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
