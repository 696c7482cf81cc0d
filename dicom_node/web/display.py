"""How the pages show times and durations: the node's time zone, no microseconds.

The database and the JSON API keep UTC (ISO 8601 with the offset); the pages show local
time in ``time_zone`` (default: the system's), e.g. ``2026-11-30 19:09:18``.
"""

from __future__ import annotations

import zoneinfo
from datetime import UTC, datetime, tzinfo

from kernel.settings import NodeSettings


def zone(settings: NodeSettings) -> tzinfo:
    """The time zone pages show times in: ``time_zone``, else the system's."""
    if settings.time_zone:
        return zoneinfo.ZoneInfo(settings.time_zone)
    return datetime.now().astimezone().tzinfo or UTC


def zone_name(tz: tzinfo) -> str:
    """``Asia/Seoul (KST)``, or the abbreviation alone for an unnamed system zone."""
    abbreviation = datetime.now(tz).tzname() or ""
    key = getattr(tz, "key", None)
    return (
        f"{key} ({abbreviation})"
        if key and abbreviation and key != abbreviation
        else (key or abbreviation or "UTC")
    )


def _parse(value: datetime | str | None) -> datetime | None:
    if value in (None, ""):
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value


class Clock:
    """Formats instants (aware datetimes or ISO strings) in one time zone."""

    def __init__(self, tz: tzinfo) -> None:
        self.tz = tz
        self.name = zone_name(tz)

    def local(self, value: datetime | str | None) -> datetime | None:
        at = _parse(value)
        return at.astimezone(self.tz) if at else None

    def datetime(self, value: datetime | str | None) -> str:
        """``2026-11-30 19:09:18`` (empty for None)."""
        at = self.local(value)
        return f"{at:%Y-%m-%d %H:%M:%S}" if at else ""

    def time(self, value: datetime | str | None) -> str:
        """``19:09:18`` (empty for None)."""
        at = self.local(value)
        return f"{at:%H:%M:%S}" if at else ""

    def short(self, value: datetime | str | None) -> str:
        """The time alone for today, the date and time otherwise."""
        at = self.local(value)
        if at is None:
            return ""
        if at.date() == datetime.now(self.tz).date():
            return f"{at:%H:%M:%S}"
        return f"{at:%Y-%m-%d %H:%M}"


def duration(value: float | None) -> str:
    """``0.4 s``, ``34 s``, ``2.5 min``, ``3.2 h`` (empty for None)."""
    if value is None:
        return ""
    if value < 10:
        return f"{value:.1f} s"
    if value < 120:
        return f"{value:.0f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def study_heading(
    accession: str | None, description: str | None, date: str | None, uid: str
) -> str:
    """What a person calls a study: its accession number, else description and date,
    else the end of its UID (never a bare "Study")."""
    if accession:
        return f"Accession {accession}"
    when = f"{date[:4]}-{date[4:6]}-{date[6:]}" if date and len(date) == 8 else (date or "")
    text = " ".join(part for part in (description, when) if part)
    return text or f"Study …{uid[-12:]}"
