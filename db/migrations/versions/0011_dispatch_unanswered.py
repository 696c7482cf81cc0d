"""dispatches.unanswered: attempts the destination did not answer

A send the destination does not answer (no association, refused connection, timeout)
is retried until ``dispatch.max_age_s`` (a PACS down for a maintenance window of hours
no longer fails every waiting result after ``max_attempts``); ``max_attempts`` bounds
only the attempts it answered with a retryable refusal (e.g. 0xA7xx out of resources),
``attempts - unanswered``. Older rows start at 0.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("dispatches") as batch:
        batch.add_column(sa.Column("unanswered", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("dispatches") as batch:
        batch.drop_column("unanswered")
