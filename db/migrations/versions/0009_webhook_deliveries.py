"""webhook_deliveries and jobs.update_urls: job status webhooks (issue 19)

A job may carry http(s) URLs (``jobs.update_urls``: the pipeline's and the API request's
``update_url``). When it ends (done, failed, cancelled, expired) a ``webhook_deliveries``
row per URL is written in the same transaction, with the exact JSON body; the node's
webhook sender POSTs it (signed) and records each answer, retrying with backoff.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import db.models

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("update_urls", sa.JSON(), nullable=True))
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("study_id", sa.Integer(), sa.ForeignKey("studies.id"), nullable=True),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("job_state", sa.String(length=16), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", db.models.UTCDateTime(), nullable=False),
        sa.Column("next_attempt_at", db.models.UTCDateTime(), nullable=False),
        sa.Column("last_attempt_at", db.models.UTCDateTime(), nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("delivered_at", db.models.UTCDateTime(), nullable=True),
        sa.Column("sending_since", db.models.UTCDateTime(), nullable=True),
        sa.Column("sending_by", sa.String(length=128), nullable=True),
    )
    op.create_index("ix_webhook_deliveries_due", "webhook_deliveries", ["state", "next_attempt_at"])
    op.create_index("ix_webhook_deliveries_job_id", "webhook_deliveries", ["job_id"])
    op.create_index("ix_webhook_deliveries_study_id", "webhook_deliveries", ["study_id"])


def downgrade() -> None:
    op.drop_index("ix_webhook_deliveries_study_id", table_name="webhook_deliveries")
    op.drop_index("ix_webhook_deliveries_job_id", table_name="webhook_deliveries")
    op.drop_index("ix_webhook_deliveries_due", table_name="webhook_deliveries")
    op.drop_table("webhook_deliveries")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("update_urls")
