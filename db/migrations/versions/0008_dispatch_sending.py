"""dispatches: who is sending a row and since when (issue 17)

A row is marked ``sending`` with the sender (``sending_by``: host, process, destination
sender) and the time (``sending_since``) before its association opens, and each C-STORE's
outcome is recorded as it comes, so a restart after a crash re-sends only the rows that
may not have arrived.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import db.models

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("dispatches") as batch:
        batch.add_column(sa.Column("sending_since", db.models.UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("sending_by", sa.String(length=128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("dispatches") as batch:
        batch.drop_column("sending_by")
        batch.drop_column("sending_since")
