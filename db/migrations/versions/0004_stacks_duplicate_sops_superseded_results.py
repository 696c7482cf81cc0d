"""instances: image stack, slice position, acquisition; one SOP Instance UID may occur in
several series; results: pipeline, result type and superseded

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import db.models

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# Names for SQLite's reflected (unnamed) constraints, so batch mode can drop them.
_NAMING = {"uq": "uq_%(table_name)s_%(column_0_name)s"}


def _sop_unique_name() -> str:
    # PostgreSQL named the column's unique constraint itself; SQLite gets ours.
    return "instances_sop_uid_key" if op.get_bind().dialect.name == "postgresql" else (
        "uq_instances_sop_uid"
    )


def upgrade() -> None:
    with op.batch_alter_table("instances", naming_convention=_NAMING) as batch:
        batch.drop_constraint(_sop_unique_name(), type_="unique")
        batch.create_unique_constraint("uq_instances_series_sop", ["series_id", "sop_uid"])
        batch.create_index("ix_instances_sop_uid", ["sop_uid"])
        batch.add_column(sa.Column("stack_key", sa.String(length=160), nullable=True))
        batch.add_column(sa.Column("slice_position_mm", sa.Float(), nullable=True))
        batch.add_column(sa.Column("acquisition_number", sa.Integer(), nullable=True))
    with op.batch_alter_table("results") as batch:
        batch.add_column(sa.Column("pipeline", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("result_type", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("superseded_at", db.models.UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("superseded_by", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("results") as batch:
        batch.drop_column("superseded_by")
        batch.drop_column("superseded_at")
        batch.drop_column("result_type")
        batch.drop_column("pipeline")
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("acquisition_number")
        batch.drop_column("slice_position_mm")
        batch.drop_column("stack_key")
        batch.drop_index("ix_instances_sop_uid")
        batch.drop_constraint("uq_instances_series_sop", type_="unique")
        batch.create_unique_constraint(_sop_unique_name(), ["sop_uid"])
