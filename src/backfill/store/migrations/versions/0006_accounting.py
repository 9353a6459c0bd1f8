"""Accounting columns (issue 15): who made a batch, its estimated tokens and its cost; engine
time per segment; admin keys; per-project settings (quotas and limits).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as t:
        t.add_column(sa.Column("api_key_id", sa.String(64), nullable=True))
        t.add_column(sa.Column("enqueued_tokens", sa.BigInteger, nullable=True))
        t.add_column(sa.Column("cost_micros", sa.BigInteger, nullable=False, server_default="0"))
        t.add_column(sa.Column("list_micros", sa.BigInteger, nullable=False, server_default="0"))
        t.add_column(sa.Column("currency", sa.String(8), nullable=True))
    with op.batch_alter_table("segments") as t:
        t.add_column(sa.Column("engine_ms", sa.BigInteger, nullable=False, server_default="0"))
    with op.batch_alter_table("api_keys") as t:
        t.add_column(sa.Column("admin", sa.Boolean, nullable=False, server_default=sa.false()))
    with op.batch_alter_table("projects") as t:
        t.add_column(sa.Column("settings", sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("projects") as t:
        t.drop_column("settings")
    with op.batch_alter_table("api_keys") as t:
        t.drop_column("admin")
    with op.batch_alter_table("segments") as t:
        t.drop_column("engine_ms")
    with op.batch_alter_table("batches") as t:
        for name in ("currency", "list_micros", "cost_micros", "enqueued_tokens", "api_key_id"):
            t.drop_column(name)
