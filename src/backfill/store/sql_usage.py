"""The usage ledger in the SQL store (`domain/usage.py`).

`insert_usage` is the one writer: it runs inside the caller's transaction (a segment's record,
a real-time request's end), and records an entry only if its `ref` is new, so the same work is
never counted twice whatever is retried. The insert is one `INSERT ... ON CONFLICT (ref) DO
NOTHING RETURNING` on both databases, so the unique index alone decides, without relying on
SQLite's `BEGIN IMMEDIATE` to close the gap a select-then-insert would leave.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any, TypeVar

from sqlalchemy import BigInteger, Connection, RowMapping, and_, func, literal, select
from sqlalchemy.dialects import postgresql, sqlite

from backfill.domain.usage import BATCH, UsageEntry
from backfill.domain.usage_reports import GROUP_KEYS, SUMMED, UsageTotal, sort_key
from backfill.store.schema import usage_ledger

T = TypeVar("T")

_COLUMNS = [c.name for c in usage_ledger.columns if c.name != "seq"]


def insert_usage(conn: Connection, entry: UsageEntry) -> bool:
    """Record `entry` in the caller's transaction unless its `ref` is recorded; True if new."""
    values = {k: v for k, v in asdict(entry).items() if k in _COLUMNS}
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    # RETURNING tells whether it inserted (rowcount is not reliable for it on every driver).
    stmt = (
        dialect.insert(usage_ledger)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["ref"])
        .returning(usage_ledger.c.seq)
    )
    return conn.execute(stmt).first() is not None


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

    def usage_totals(
        self,
        *,
        start: int,
        end: int,
        width: int,
        group_by: Sequence[str] = (),
        project_ids: Sequence[str] | None = None,
        api_key_ids: Sequence[str] | None = None,
        models: Sequence[str] | None = None,
        endpoints: Sequence[str] | None = None,
        batch: bool | None = None,
    ) -> list[UsageTotal]:
        # One GROUP BY over bucket indexes: `(at - start) / width` in integers on both SQLite
        # and PostgreSQL (`at >= start`, so truncating is flooring).
        u = usage_ledger
        unknown = set(group_by) - set(GROUP_KEYS)
        if unknown:
            raise ValueError(f"cannot group usage by {sorted(unknown)}")
        where: list[Any] = [u.c.at >= start, u.c.at < end]
        for column, values in (
            (u.c.project_id, project_ids),
            (u.c.api_key_id, api_key_ids),
            (u.c.model, models),
            (u.c.endpoint, endpoints),
        ):
            if values is not None:
                where.append(column.in_(list(values)))
        if batch is not None:
            where.append(u.c.kind == BATCH if batch else u.c.kind != BATCH)
        # `//`: SQLAlchemy's `/` is true division (a NUMERIC cast); `//` on integers renders `/`
        index = ((u.c.at - literal(start, BigInteger)) // literal(width, BigInteger)).label(
            "bucket_index"
        )
        columns = {
            "project_id": u.c.project_id,
            "api_key_id": u.c.api_key_id,
            "model": u.c.model,
            "batch": u.c.kind,
            "currency": u.c.currency,
        }
        keys = [columns[k].label(k) for k in GROUP_KEYS if k in group_by]
        sums = [func.sum(u.c[name]).label(name) for name in SUMMED]
        q = select(index, *keys, *sums).where(and_(*where)).group_by(index, *keys)

        def work(conn: Connection) -> list[UsageTotal]:
            totals = []
            for r in conn.execute(q).mappings():
                found: dict[str, Any] = {k: r[k] for k in GROUP_KEYS if k in group_by}
                if "batch" in found:
                    found["batch"] = found["batch"] == BATCH
                found |= {s.name: int(r[s.name] or 0) for s in sums}
                totals.append(UsageTotal(bucket=start + int(r["bucket_index"]) * width, **found))
            return sorted(totals, key=sort_key)

        return self._run(work, write=False)
