"""Duty claims, a batch warning, and the worker that recorded each segment.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "claims",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("warning", sa.Text, nullable=True))
    with op.batch_alter_table("segments") as seg:
        seg.add_column(sa.Column("owner", sa.String(128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("segments") as seg:
        seg.drop_column("owner")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("warning")
    op.drop_table("claims")
