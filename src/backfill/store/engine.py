"""Engines for the SQL store: URL normalization and the SQLite transaction recipe.

- `postgres://` / `postgresql://` mean psycopg 3 (the installed driver).
- SQLite: pysqlite's own transaction handling is switched off (`isolation_level = None`) and
  the "begin" event emits `BEGIN IMMEDIATE` for writing transactions, so a transaction that
  reads and then writes holds the write lock from its first statement and can never fail with
  SQLITE_BUSY on a lock upgrade; it waits (busy_timeout 30 s) instead. Connections whose
  execution options carry `READ_ONLY` get a plain deferred `BEGIN`, which under WAL never
  blocks or is blocked by writers. `synchronous=NORMAL` is durable against process crashes
  (all WAL needs); a power cut may lose the last commits, which the lease protocol tolerates
  (the work is redone). Transactional DDL works too, which migrations rely on. Switching a
  fresh file to WAL is retried while it is locked (SQLite does not wait on that one).
- `sqlite://` (in memory) uses one shared connection (StaticPool): otherwise every pooled
  connection would see its own empty database.
- PostgreSQL pools ping connections before use so a restarted server costs one retry, not an
  error.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import StaticPool

READ_ONLY = "backfill_read_only"


def normalize_url(url: str) -> URL:
    """`postgres(ql)://` means psycopg 3 (the installed driver); everything else as given."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            url = "postgresql+psycopg://" + url[len(prefix) :]
    return make_url(url)


def _switch_to_wal(cursor: Any, *, within: float = 30.0) -> None:
    """`PRAGMA journal_mode = WAL`, retried while the database is locked: SQLite answers
    SQLITE_BUSY at once to a journal-mode change that needs a lock another process holds (it
    does not wait out the busy timeout), which happens when several processes open a fresh
    database at once (a server and its workers, or the migration test: once in ~100 openings)."""
    deadline = time.monotonic() + within
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def create_store_engine(url: URL, *, pool_size: int, max_overflow: int) -> Engine:
    if url.get_backend_name() != "sqlite":
        return create_engine(
            url, pool_size=pool_size, max_overflow=max_overflow, pool_pre_ping=True
        )
    database = url.database or ""
    in_memory = database in ("", ":memory:") or database.startswith("file::memory:")
    if in_memory:
        engine = create_engine(url, connect_args={"check_same_thread": False}, poolclass=StaticPool)
    else:
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=pool_size,
            max_overflow=max_overflow,
        )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves, below
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA busy_timeout = 30000")
            if not in_memory:
                _switch_to_wal(cursor)
            cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        read_only = conn.get_execution_options().get(READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine
