"""series: enhanceable flag and the recorded reason why a series is not enhanced

``is_derived`` now means a secondary derived series; rows indexed before as DERIVED\\PRIMARY
(reconstructed acquisitions) are relabelled.  Their completeness check is not reset, so an
upgrade never queues old series; new instances make them candidates as usual.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from storage.records import is_secondary_derived

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
    series = sa.table(
        "series",
        sa.column("id", sa.Integer),
        sa.column("image_type", sa.String),
        sa.column("is_derived", sa.Boolean),
    )
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(series.c.id, series.c.image_type).where(series.c.is_derived.is_(True))
    ).all()
    acquisitions = [
        row.id for row in rows if not is_secondary_derived((row.image_type or "").split("\\"))
    ]
    if acquisitions:
        conn.execute(
            series.update().where(series.c.id.in_(acquisitions)).values(is_derived=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("series") as batch:
        batch.drop_column("skip_reason")
        batch.drop_column("enhanceable")
