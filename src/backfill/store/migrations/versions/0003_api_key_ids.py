"""API keys get an id, a display prefix, a source and a revocation time.

`id` (`key_...`) names a key in `backfill keys list/revoke` without revealing it; `prefix` is
the first few characters of the key, for people to recognize it (NULL for keys made before
this migration: only their hash is known); `source` is `cli` (`backfill keys create`), `flag`
(given to `backfill serve` with `--api-key`, the config file or `BACKFILL_API_KEYS`: valid only
while given) or `legacy` (made before this migration, by either); `revoked_at` ends a key.

Existing rows get random ids here (with Python's `secrets`, on both databases), then `id` is
made NOT NULL and unique.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import secrets
import string

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

_ALPHABET = string.ascii_letters + string.digits


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as keys:
        keys.add_column(sa.Column("id", sa.String(64), nullable=True))
        keys.add_column(sa.Column("prefix", sa.String(32), nullable=True))
        keys.add_column(sa.Column("source", sa.String(16), nullable=False, server_default="legacy"))
        keys.add_column(sa.Column("revoked_at", sa.BigInteger, nullable=True))
    table = sa.table("api_keys", sa.column("key_hash", sa.String), sa.column("id", sa.String))
    conn = op.get_bind()
    for key_hash in conn.execute(sa.select(table.c.key_hash)).scalars().all():
        key_id = "key_" + "".join(secrets.choice(_ALPHABET) for _ in range(16))
        conn.execute(table.update().where(table.c.key_hash == key_hash).values(id=key_id))
    with op.batch_alter_table("api_keys") as keys:
        keys.alter_column("id", existing_type=sa.String(64), nullable=False)
    op.create_index("ix_api_keys_id", "api_keys", ["id"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_api_keys_id", table_name="api_keys")
    with op.batch_alter_table("api_keys") as keys:
        keys.drop_column("revoked_at")
        keys.drop_column("source")
        keys.drop_column("prefix")
        keys.drop_column("id")
