"""Alembic environment for the backfill store.

Migrations run only programmatically, from `SqlStore.migrate()`, which passes an open
connection (already inside a transaction and, on PostgreSQL, holding the migration advisory
lock) as `config.attributes["connection"]`. There is no alembic.ini and no offline mode.
The version table is `backfill_alembic_version` so backfill can share a database with other
applications that use Alembic.
"""

from __future__ import annotations

from alembic import context

from backfill.store.schema import metadata

VERSION_TABLE = "backfill_alembic_version"


def run_migrations() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("backfill migrations run from SqlStore.migrate(), with a connection")
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
