"""The usage ledger in the SQL store (`domain/usage.py`).

`insert_usage` is the one writer: it runs inside the caller's transaction (a segment's record,
a real-time request's end), and records an entry only if its `ref` is new, so the same work is
never counted twice whatever is retried. On PostgreSQL the insert is `ON CONFLICT DO NOTHING`;
SQLite serializes writers (`BEGIN IMMEDIATE`), so a select first is enough there, and the
unique index backs both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any, TypeVar

from sqlalchemy import Connection, RowMapping, and_, insert, select
from sqlalchemy.dialects import postgresql

from backfill.domain.usage import UsageEntry
from backfill.store.schema import usage_ledger

T = TypeVar("T")

_COLUMNS = [c.name for c in usage_ledger.columns if c.name != "seq"]


def insert_usage(conn: Connection, entry: UsageEntry) -> bool:
    """Record `entry` in the caller's transaction unless its `ref` is recorded; True if new."""
    values = {k: v for k, v in asdict(entry).items() if k in _COLUMNS}
    if conn.dialect.name == "postgresql":
        # RETURNING tells whether it inserted (rowcount is not reliable for it on every driver)
        stmt = (
            postgresql.insert(usage_ledger)
            .values(**values)
            .on_conflict_do_nothing(index_elements=["ref"])
            .returning(usage_ledger.c.seq)
        )
        return conn.execute(stmt).first() is not None
    found = conn.execute(select(usage_ledger.c.seq).where(usage_ledger.c.ref == entry.ref))
    if found.first() is not None:
        return False
    conn.execute(insert(usage_ledger).values(**values))
    return True


def usage_entry(row: RowMapping) -> UsageEntry:
    return UsageEntry(**{k: row[k] for k in (*_COLUMNS, "seq")})


class SqlUsageMixin:
    def _run(self, work: Callable[[Connection], T], *, write: bool = True) -> T:
        raise NotImplementedError

    def record_usage(self, entry: UsageEntry) -> bool:
        return self._run(lambda conn: insert_usage(conn, entry))

    def usage_entries(
        self,
        *,
        start: int | None = None,
        end: int | None = None,
        project_id: str | None = None,
        batch_id: str | None = None,
        after_seq: int = 0,
        limit: int = 1000,
    ) -> list[UsageEntry]:
        u = usage_ledger
        where: list[Any] = [u.c.seq > after_seq]
        if start is not None:
            where.append(u.c.at >= start)
        if end is not None:
            where.append(u.c.at < end)
        if project_id is not None:
            where.append(u.c.project_id == project_id)
        if batch_id is not None:
            where.append(u.c.batch_id == batch_id)
        q = select(u).where(and_(*where)).order_by(u.c.seq).limit(limit)
        return self._run(
            lambda conn: [usage_entry(r) for r in conn.execute(q).mappings()], write=False
        )
