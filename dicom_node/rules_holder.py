"""The rules in force, reloaded when the file changes; a broken file keeps the old rules.

Every reload, good or broken, is an event and an audit record (file and its SHA-256)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from db.models import utcnow
from db.session import Database
from dicom_node import audit
from dicom_node.rules import RulesError, RuleSet, load_rules
from kernel.events import add_event
from kernel.vocabulary import EventKind, EventLevel

log = logging.getLogger("dicom_node.rules")


@dataclass
class ReloadStatus:
    at: datetime
    ok: bool
    message: str


class RulesHolder:
    """The rules in force for the live node; ``get()`` re-reads the file when it changed.

    At construction a broken file raises ``RulesError`` (the node does not start); later
    a broken edit is logged and recorded as an event, and the previous rules stay.
    """

    def __init__(self, path: Path, db: Database | None = None, **known: Any) -> None:
        self.path = Path(path)
        self.db = db
        self.known = known
        self._lock = threading.Lock()
        self._mtime = self._stat()
        self._rules = load_rules(self.path, **known)  # at start a broken file is fatal
        self.last_reload = ReloadStatus(utcnow(), True, f"loaded {self.path}")

    def _stat(self) -> float | None:
        try:
            return self.path.stat().st_mtime_ns
        except OSError:
            return None

    def get(self) -> RuleSet:
        """The rules in force; reloads first when the file changed on disk."""
        mtime = self._stat()
        if mtime != self._mtime:
            with self._lock:
                if mtime != self._mtime:
                    self._mtime = mtime
                    self._reload()
        return self._rules

    def _reload(self) -> None:
        try:
            rules = load_rules(self.path, **self.known)
        except RulesError as exc:
            self.last_reload = ReloadStatus(utcnow(), False, str(exc))
            log.error("rules reload failed, the previous rules stay in force:\n%s", exc)
            if self.db is not None:
                with self.db.session() as s:
                    add_event(
                        s,
                        EventKind.RULES_RELOAD_FAILED,
                        f"previous rules stay in force: {exc}",
                        level=EventLevel.ERROR,
                    )
                self._audit(audit.Outcome.FAILURE, str(exc))
            return
        self._rules = rules
        self.last_reload = ReloadStatus(utcnow(), True, f"reloaded {self.path}")
        log.info("rules reloaded from %s", self.path)
        if self.db is not None:
            with self.db.session() as s:
                add_event(s, EventKind.RULES_RELOADED, f"rules reloaded from {self.path}")
            self._audit(audit.Outcome.SUCCESS, None)

    def _audit(self, outcome: audit.Outcome, problem: str | None) -> None:
        assert self.db is not None
        audit.record(
            self.db,
            audit.Action.RULES_RELOADED,
            audit.SYSTEM,
            outcome=outcome,
            object_type="rules_file",
            object_id=str(self.path),
            detail={"sha256": audit.file_digest(self.path), "problem": problem},
        )
