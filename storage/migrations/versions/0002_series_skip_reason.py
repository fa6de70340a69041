"""series: enhanceable flag and the recorded reason why a series is not enhanced

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("series") as batch:
        batch.add_column(
            sa.Column("enhanceable", sa.Boolean(), nullable=False, server_default=sa.true())
        )
        batch.add_column(sa.Column("skip_reason", sa.String(length=256), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("series") as batch:
        batch.drop_column("skip_reason")
        batch.drop_column("enhanceable")
