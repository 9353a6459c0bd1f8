"""A scratch PostgreSQL database for tests: created on the server that `BACKFILL_TEST_POSTGRES_URL`
names, dropped afterwards, so tests never touch real data. Shared by the store contract suite
and the fault tier."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from sqlalchemy.engine import make_url

PG_ENV = "BACKFILL_TEST_POSTGRES_URL"


def libpq_url(url: str) -> str:
    """A URL psycopg understands (no SQLAlchemy driver suffix)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextmanager
def scratch_postgres_database() -> Iterator[str]:
    """Create an empty database on the test server; yield its URL; drop it afterwards. Skips
    the calling test when no server is configured."""
    admin = os.environ.get(PG_ENV)
    if not admin:
        import pytest

        pytest.skip(f"{PG_ENV} is not set")
    name = f"bf_test_{secrets.token_hex(6)}"
    with psycopg.connect(libpq_url(admin), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(libpq_url(admin)).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(libpq_url(admin), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
