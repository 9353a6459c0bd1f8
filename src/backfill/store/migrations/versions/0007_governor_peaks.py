"""The governor's reference peak per model (`governor_peaks`), kept across restarts.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-09
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "governor_peaks",
        sa.Column("model", sa.String(255), primary_key=True),
        sa.Column("reference", sa.Float, nullable=False),
        sa.Column("saved_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("governor_peaks")
