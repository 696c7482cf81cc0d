"""outbox: when a row was (re)queued (maximum delivery age); storage commitment

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import db.models

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("dispatches") as batch:
        batch.add_column(sa.Column("queued_at", db.models.UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("commit_uid", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("committed_at", db.models.UTCDateTime(), nullable=True))
        batch.create_index("ix_dispatches_commit_uid", ["commit_uid"])


def downgrade() -> None:
    with op.batch_alter_table("dispatches") as batch:
        batch.drop_index("ix_dispatches_commit_uid")
        batch.drop_column("committed_at")
        batch.drop_column("commit_uid")
        batch.drop_column("queued_at")
