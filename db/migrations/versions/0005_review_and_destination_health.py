"""dispatches: last attempt and review (held / approved / rejected by whom, when, why);
destination_echoes: persisted C-ECHO results for destination health

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import db.models

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("dispatches") as batch:
        batch.add_column(sa.Column("last_attempt_at", db.models.UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("reviewed_by", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("reviewed_at", db.models.UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("review_note", sa.Text(), nullable=True))
        batch.create_index("ix_dispatches_destination_attempt", ["destination", "last_attempt_at"])
    op.create_table(
        "destination_echoes",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("at", db.models.UTCDateTime(), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("round_trip_ms", sa.Float(), nullable=True),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("requested_by", sa.String(length=64), nullable=True),
    )
    op.create_index(
        "ix_destination_echoes_destination_at", "destination_echoes", ["destination", "at"]
    )


def downgrade() -> None:
    op.drop_index("ix_destination_echoes_destination_at", table_name="destination_echoes")
    op.drop_table("destination_echoes")
    with op.batch_alter_table("dispatches") as batch:
        batch.drop_index("ix_dispatches_destination_attempt")
        batch.drop_column("review_note")
        batch.drop_column("reviewed_at")
        batch.drop_column("reviewed_by")
        batch.drop_column("last_attempt_at")
