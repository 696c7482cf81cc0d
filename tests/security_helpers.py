"""Helpers of the security tests: a node per test module, one user and token per role,
and reading the audit trail back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import select

from db.models import AuditRecord
from dicom_node.web.users import ROLES, add_user, create_token
from tests.conftest import node_settings
from tests.web_helpers import PASSWORD, modelless_settings


@contextmanager
def running_node(folder: Path, **overrides: Any) -> Iterator[Any]:
    """A running node without models (worker off) for a whole test module."""
    from dicom_node.service import Node

    settings = {**modelless_settings(folder), **overrides}
    node = Node(node_settings(folder, **settings), stop_grace_s=5).start()
    try:
        yield node
    finally:
        node.stop()


def role_users(node: Any) -> dict[str, dict[str, str]]:
    """A user per role (``<role>-user``, PASSWORD) and its bearer header, by role."""
    headers = {}
    for role in ROLES:
        add_user(node.db, f"{role}-user", PASSWORD, role)
        token = create_token(node.db, f"{role}-user", f"{role} tests")
        headers[role] = {"Authorization": f"Bearer {token}"}
    return headers


def audit_rows(node: Any, **where: Any) -> list[AuditRecord]:
    """Audit records whose columns equal ``where``, oldest first."""
    with node.db.session() as s:
        query = select(AuditRecord).order_by(AuditRecord.id)
        for column, value in where.items():
            query = query.where(getattr(AuditRecord, column) == value)
        return list(s.scalars(query))
