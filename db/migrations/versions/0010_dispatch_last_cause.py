"""dispatches.last_cause: who decided how the last send attempt ended

``destination`` (it answered), ``no answer`` (no association, refused connection,
timeout) or ``node`` (this node failed itself, e.g. a conversion for the destination):
destination health no longer reads an error of the node as the destination being
unreachable. NULL on older rows (health then reads ``last_status`` as before).

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("dispatches") as batch:
        batch.add_column(sa.Column("last_cause", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("dispatches") as batch:
        batch.drop_column("last_cause")
