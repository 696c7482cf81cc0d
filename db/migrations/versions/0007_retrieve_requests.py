"""retrieve_requests: studies asked for from a configured source (C-MOVE, C-GET,
WADO-RS), their state and progress

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import db.models

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "retrieve_requests",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=True),
        sa.Column("accession_number", sa.String(length=16), nullable=True),
        sa.Column("patient_id", sa.String(length=64), nullable=True),
        sa.Column("date_from", sa.String(length=8), nullable=True),
        sa.Column("date_to", sa.String(length=8), nullable=True),
        sa.Column("pipelines", sa.JSON(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("method", sa.String(length=16), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("instances_expected", sa.Integer(), nullable=True),
        sa.Column("instances_received", sa.Integer(), nullable=False),
        sa.Column("instances_failed", sa.Integer(), nullable=False),
        sa.Column("requested_by", sa.String(length=128), nullable=False),
        sa.Column("requested_at", db.models.UTCDateTime(), nullable=False),
        sa.Column("started_at", db.models.UTCDateTime(), nullable=True),
        sa.Column("updated_at", db.models.UTCDateTime(), nullable=False),
        sa.Column("finished_at", db.models.UTCDateTime(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=True),
    )
    op.create_index("ix_retrieve_requests_state_id", "retrieve_requests", ["state", "id"])
    op.create_index("ix_retrieve_requests_study_uid", "retrieve_requests", ["study_uid"])


def downgrade() -> None:
    op.drop_index("ix_retrieve_requests_study_uid", table_name="retrieve_requests")
    op.drop_index("ix_retrieve_requests_state_id", table_name="retrieve_requests")
    op.drop_table("retrieve_requests")
