"""Migrations on the SQL backends: many processes may migrate an empty database at once, and the
migrated schema is exactly `backfill.store.schema`. `empty_url` (conftest) is an empty SQLite
file or an empty scratch PostgreSQL database."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from backfill.store.schema import metadata
from backfill.store.sql import SqlStore

MIGRATE = """
import sys, time
from backfill.store.sql import SqlStore
store = SqlStore(sys.argv[1])
while time.time() < float(sys.argv[2]):  # start together: all imports are done by then
    time.sleep(0.005)
store.migrate()
store.ensure_project("p")
store.close()
"""


def test_concurrent_migrations_of_an_empty_database(empty_url: str) -> None:
    """Several processes start at once on an empty database (what `backfill serve` plus a few
    `backfill worker`s do); every one of them migrates without error."""
    start_at = time.time() + 3.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MIGRATE, empty_url, str(start_at)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), outputs
    store = SqlStore(empty_url)
    try:
        store.migrate()
        assert len({store.ensure_project("p").id}) == 1
    finally:
        store.close()


def test_concurrent_migrations_in_one_process(empty_url: str) -> None:
    stores = [SqlStore(empty_url) for _ in range(4)]
    barrier = threading.Barrier(len(stores))
    failures: list[BaseException] = []

    def migrate(store: SqlStore) -> None:
        try:
            barrier.wait(timeout=30)
            store.migrate()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=migrate, args=(s,), daemon=True) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert not any(t.is_alive() for t in threads)
        assert failures == []
        assert stores[0].ensure_project("p") == stores[1].ensure_project("p")
    finally:
        for s in stores:
            s.close()


def test_migrated_schema_matches_metadata(empty_url: str) -> None:
    store = SqlStore(empty_url)
    try:
        store.migrate()
        with store.engine.connect() as conn:
            context = MigrationContext.configure(
                conn,
                opts={"compare_type": True, "version_table": "backfill_alembic_version"},
            )
            assert compare_metadata(context, metadata) == []
            tables = set(inspect(conn).get_table_names())
        assert tables == set(metadata.tables) | {"backfill_alembic_version"}
    finally:
        store.close()
