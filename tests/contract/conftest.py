"""Fixtures that run one contract suite on every store backend.

- `memory`: a fresh `MemoryStore` per test (other "processes" share the same instance).
- `sqlite`: a fresh database file per test in `tmp_path`, migrated.
- `postgres`: only when `BACKFILL_TEST_POSTGRES_URL` points at a server (any database on it is
  fine; it is used as the maintenance connection). One scratch database `bf_test_<random>` is
  created per test session, migrated once, emptied after every test and dropped at the end,
  so tests never touch real data and never see each other's rows.

`backend.open()` returns another store on the same data, the way a second process would see
it (its own engine and connection pool), which is what the concurrency tests need.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from backfill.store import Store
from backfill.store.memory import MemoryStore
from backfill.store.sql import SqlStore
from backfill.testing.postgres import libpq_url, scratch_postgres_database

TABLES = (
    "projects", "api_keys", "files", "batches", "shards", "segments", "claims",
    "webhook_endpoints", "webhook_deliveries", "usage_ledger", "governor_peaks",
)  # fmt: skip


_libpq = libpq_url


@dataclass
class Backend:
    kind: str
    open: Callable[[], Store]
    opened: list[Store] = field(default_factory=list)

    def store(self) -> Store:
        store = self.open()
        self.opened.append(store)
        return store

    def close_all(self) -> None:
        for store in self.opened:
            store.close()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    with scratch_postgres_database() as url:
        store = SqlStore(url)
        store.migrate()
        store.close()
        yield url


BACKENDS = ["memory", "sqlite", "postgres"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    kind: str = request.param
    if kind == "memory":
        shared = MemoryStore()
        b = Backend(kind, lambda: shared)
    elif kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
        first = SqlStore(url)
        first.migrate()
        first.close()
        b = Backend(kind, lambda: SqlStore(url))
    else:
        pg_url: str = request.getfixturevalue("postgres_url")
        b = Backend(kind, lambda: SqlStore(pg_url))
    try:
        yield b
    finally:
        b.close_all()
        if kind == "postgres":
            with psycopg.connect(_libpq(pg_url), autocommit=True) as conn:
                conn.execute(f"TRUNCATE {', '.join(TABLES)}")


@pytest.fixture
def store(backend: Backend) -> Store:
    return backend.store()


@pytest.fixture(params=["sqlite", "postgres"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database (never migrated) on each SQL backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh' / 'store.db'}"
    else:
        with scratch_postgres_database() as url:
            yield url
