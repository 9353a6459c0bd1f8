"""The usage ledger (`usage_ledger`): one row per recorded segment or real-time request.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None

_SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "usage_ledger",
        sa.Column("seq", _SEQ, primary_key=True, autoincrement=True),
        sa.Column("ref", sa.String(255), nullable=False, unique=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("project_id", sa.String(64), nullable=False),
        sa.Column("api_key_id", sa.String(64), nullable=True),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("endpoint", sa.String(128), nullable=False),
        sa.Column("batch_id", sa.String(64), nullable=True),
        sa.Column("at", sa.BigInteger, nullable=False),
        sa.Column("requests", sa.BigInteger, nullable=False),
        sa.Column("input_tokens", sa.BigInteger, nullable=False),
        sa.Column("cached_tokens", sa.BigInteger, nullable=False),
        sa.Column("output_tokens", sa.BigInteger, nullable=False),
        sa.Column("reasoning_tokens", sa.BigInteger, nullable=False),
        sa.Column("engine_ms", sa.BigInteger, nullable=False),
        sa.Column("cost_micros", sa.BigInteger, nullable=False),
        sa.Column("list_micros", sa.BigInteger, nullable=False),
        sa.Column("currency", sa.String(8), nullable=True),
    )
    op.create_index("ix_usage_ledger_at", "usage_ledger", ["at"])
    op.create_index("ix_usage_ledger_project_at", "usage_ledger", ["project_id", "at"])
    op.create_index("ix_usage_ledger_batch", "usage_ledger", ["batch_id"])


def downgrade() -> None:
    op.drop_table("usage_ledger")
