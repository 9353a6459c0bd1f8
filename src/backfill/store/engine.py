"""Engines for the SQL store: URL normalization, the SQLite transaction recipe, and how long
anything may wait for the database.

- `postgres://` / `postgresql://` mean psycopg 3 (the installed driver).
- SQLite: pysqlite's own transaction handling is switched off (`isolation_level = None`) and
  the "begin" event emits `BEGIN IMMEDIATE` for writing transactions, so a transaction that
  reads and then writes holds the write lock from its first statement and can never fail with
  SQLITE_BUSY on a lock upgrade; it waits (the busy timeout) instead. Connections whose
  execution options carry `READ_ONLY` get a plain deferred `BEGIN`, which under WAL never
  blocks or is blocked by writers. `synchronous=NORMAL` is durable against process crashes
  (all WAL needs); a power cut may lose the last commits, which the lease protocol tolerates
  (the work is redone). Transactional DDL works too, which migrations rely on. Switching a
  fresh file to WAL is retried while it is locked (SQLite does not wait on that one).
- A stuck database (another process holding SQLite's write lock, a PostgreSQL row or table
  lock, every pooled connection taken) costs a call at most `busy_timeout` seconds per wait:
  SQLite's busy timeout, PostgreSQL's `lock_timeout` (set on every connection) and the pool's
  checkout timeout all come from it, and the store turns running out of it into `StoreBusy`
  (503, retry later). Waiting 30 s in a worker thread, as before, let blocked writers use up
  the threads and connections that reads needed. The `PATIENCE` execution option lets one
  transaction wait longer (migrations, which many processes may start at once).
- Reads and writes get separate engines, so separate connection pools (`create_store_engines`):
  writers stuck on a lock can hold every write connection, never a read's.
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
#: execution option: seconds this transaction may wait for locks instead of the busy timeout
PATIENCE = "backfill_patience"


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


def create_store_engines(
    url: URL, *, pool_size: int, max_overflow: int, busy_timeout: float
) -> tuple[Engine, Engine]:
    """(writes, reads): two engines with their own pools; reads carry `READ_ONLY`. An
    in-memory SQLite database has one shared connection, so one engine serves both."""
    if url.get_backend_name() == "sqlite" and _in_memory(url):
        engine = create_engine(url, connect_args={"check_same_thread": False}, poolclass=StaticPool)
        _sqlite_events(engine, in_memory=True, busy_timeout=busy_timeout)
        return engine, engine.execution_options(**{READ_ONLY: True})
    writes, reads = (
        _create_engine(
            url, pool_size=pool_size, max_overflow=max_overflow, busy_timeout=busy_timeout
        )
        for _ in range(2)
    )
    return writes, reads.execution_options(**{READ_ONLY: True})


def _in_memory(url: URL) -> bool:
    database = url.database or ""
    return database in ("", ":memory:") or database.startswith("file::memory:")


def _create_engine(url: URL, *, pool_size: int, max_overflow: int, busy_timeout: float) -> Engine:
    pooling: dict[str, Any] = {
        "pool_size": pool_size,
        "max_overflow": max_overflow,
        "pool_timeout": busy_timeout,
    }
    if url.get_backend_name() != "sqlite":
        engine = create_engine(url, pool_pre_ping=True, **pooling)
        _postgres_events(engine, busy_timeout=busy_timeout)
        return engine
    Path(url.database or "").expanduser().parent.mkdir(parents=True, exist_ok=True)
    connect_args = {"check_same_thread": False, "timeout": busy_timeout}
    engine = create_engine(url, connect_args=connect_args, **pooling)
    _sqlite_events(engine, in_memory=False, busy_timeout=busy_timeout)
    return engine


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _sqlite_events(engine: Engine, *, in_memory: bool, busy_timeout: float) -> None:
    default_ms = _milliseconds(busy_timeout)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves, below
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {default_ms}")
            record.info["busy_ms"] = default_ms
            if not in_memory:
                _switch_to_wal(cursor)
            cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        options = conn.get_execution_options()
        patience = options.get(PATIENCE)
        wait_ms = default_ms if patience is None else _milliseconds(patience)
        if conn.info.get("busy_ms") != wait_ms:  # per connection; set back after a migration
            conn.exec_driver_sql(f"PRAGMA busy_timeout = {wait_ms}")
            conn.info["busy_ms"] = wait_ms
        conn.exec_driver_sql("BEGIN" if options.get(READ_ONLY, False) else "BEGIN IMMEDIATE")


def _postgres_events(engine: Engine, *, busy_timeout: float) -> None:
    default_ms = _milliseconds(busy_timeout)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        with dbapi_connection.cursor() as cursor:
            cursor.execute(f"SET lock_timeout = {default_ms}")
        dbapi_connection.commit()  # a SET inside a transaction that rolls back is undone

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        patience = conn.get_execution_options().get(PATIENCE)
        if patience is not None:
            conn.exec_driver_sql(f"SET LOCAL lock_timeout = {_milliseconds(patience)}")
