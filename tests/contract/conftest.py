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

import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from backfill.store import Store
from backfill.store.memory import MemoryStore
from backfill.store.sql import SqlStore

PG_ENV = "BACKFILL_TEST_POSTGRES_URL"
TABLES = ("projects", "api_keys", "files", "batches", "shards", "segments", "claims")


def _libpq(url: str) -> str:
    """A URL psycopg understands (no SQLAlchemy driver suffix)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextmanager
def scratch_postgres_database() -> Iterator[str]:
    """Create an empty database on the test server; yield its URL; drop it afterwards."""
    admin = os.environ.get(PG_ENV)
    if not admin:
        pytest.skip(f"{PG_ENV} is not set")
    name = f"bf_test_{secrets.token_hex(6)}"
    with psycopg.connect(_libpq(admin), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(_libpq(admin)).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(_libpq(admin), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


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
