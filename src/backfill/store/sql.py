"""`Store` over SQLAlchemy Core 2.x, for SQLite (the default) and PostgreSQL.

Design decisions:
- One method, one short transaction, run through `_run`, which is also the seam where every
  SQLAlchemy/driver exception becomes a `StoreError` (our own `BackfillError`s, e.g. the
  idempotency `Conflict`, pass through untouched). PostgreSQL deadlocks and serialization
  failures are retried a few times, since each unit of work is a pure function of its inputs.
- State changes are conditional UPDATEs (`WHERE status IN (...)`, `WHERE lease_token = ... AND
  status = 'leased'`); the rowcount tells the caller whether it won. This is what makes many
  schedulers and workers on one database safe without any other coordination.
- SQLite: writing transactions start with `BEGIN IMMEDIATE` and read-only methods run on an
  engine view with the `READ_ONLY` execution option (plain `BEGIN`); see `engine.py`.
- Leases, fenced checkpoints and duty claims live in `sql_work.py` (a mixin). PostgreSQL:
  leasing is `SELECT ... FOR UPDATE SKIP LOCKED` on the shards table alone, so concurrent
  workers never wait on each other and never get the same shard. Migrations take a
  transaction-scoped advisory lock so many processes can start at once (on SQLite,
  `BEGIN IMMEDIATE` does the same); within one process a thread lock guards Alembic's global
  state.
- Queries use nothing dialect-specific beyond `with_for_update` (ignored by SQLite).
- Idempotent inserts select first, then insert inside a SAVEPOINT; losing a race on the unique
  constraint rolls back only the savepoint and re-reads the winner's row.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    Engine,
    and_,
    insert,
    select,
    text,
    update,
)
from sqlalchemy import delete as sql_delete
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError

from backfill.domain.ids import new_project_id
from backfill.domain.records import (
    BatchRecord,
    FileRecord,
    Project,
    Shard,
    ShardStatus,
)
from backfill.domain.statuses import TERMINAL, BatchStatus
from backfill.errors import BackfillError, Conflict, StoreError
from backfill.store.base import Page
from backfill.store.engine import READ_ONLY, create_store_engine, normalize_url
from backfill.store.rows import (
    batch_changes,
    batch_record,
    batch_values,
    file_record,
)
from backfill.store.rules import IDEMPOTENCY_CONFLICT, KEY_CONFLICT, check_batch_fields
from backfill.store.schema import api_keys, batches, files, projects
from backfill.store.schema import shards as _shards_table  # `shards` is also a method name
from backfill.store.sql_work import SqlWorkMixin

T = TypeVar("T")

MIGRATIONS = Path(__file__).parent / "migrations"
# pg_advisory_xact_lock key for schema migrations (any fixed 64-bit number).
MIGRATION_LOCK_KEY = 0x6261636B66696C6C  # "backfill"
# Alembic keeps its migration context in module globals, so two threads of one process must
# not run it at once; the database lock below serializes processes.
_MIGRATION_THREAD_LOCK = threading.Lock()
_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})  # serialization failure, deadlock


class SqlStore(SqlWorkMixin):
    def __init__(self, url: str, *, pool_size: int = 5, max_overflow: int = 20) -> None:
        self.url = normalize_url(url)
        self._engine = create_store_engine(self.url, pool_size=pool_size, max_overflow=max_overflow)
        self._read_engine = self._engine.execution_options(**{READ_ONLY: True})
        self._postgres = self._engine.dialect.name == "postgresql"

    def __repr__(self) -> str:
        return f"SqlStore({self.url.render_as_string(hide_password=True)})"

    @property
    def engine(self) -> Engine:
        return self._engine

    # -- plumbing ----------------------------------------------------------------------------
    def _run(self, work: Callable[[Connection], T], *, write: bool = True) -> T:
        engine = self._engine if write else self._read_engine
        for attempt in itertools.count():
            try:
                with engine.begin() as conn:
                    return work(conn)
            except BackfillError:
                raise
            except DBAPIError as exc:
                sqlstate = getattr(exc.orig, "sqlstate", None)
                if sqlstate in _RETRYABLE_SQLSTATES and attempt < 5:
                    continue
                raise StoreError(f"metadata store failed: {exc.orig}") from exc
            except SQLAlchemyError as exc:
                raise StoreError(f"metadata store failed: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    # -- lifecycle ---------------------------------------------------------------------------
    def migrate(self) -> None:
        from alembic import command
        from alembic.config import Config
        from alembic.util import CommandError

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))

        def work(conn: Connection) -> None:
            if self._postgres:
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

        try:
            with _MIGRATION_THREAD_LOCK:
                self._run(work)
        except CommandError as exc:
            raise StoreError(f"schema migration failed: {exc}") from exc

    def close(self) -> None:
        self._engine.dispose()

    # -- projects and keys -------------------------------------------------------------------
    def ensure_project(self, name: str) -> Project:
        query = select(projects.c.id, projects.c.name).where(projects.c.name == name)

        def work(conn: Connection) -> Project:
            row = conn.execute(query).first()
            if row is not None:
                return Project(row.id, row.name)
            project = Project(new_project_id(), name)
            try:
                with conn.begin_nested():
                    conn.execute(
                        insert(projects).values(
                            id=project.id, name=name, created_at=int(time.time())
                        )
                    )
            except IntegrityError:
                row = conn.execute(query).first()
                if row is None:
                    raise
                return Project(row.id, row.name)
            return project

        return self._run(work)

    def add_api_key(self, project_id: str, key_hash: str, now: int) -> None:
        query = select(api_keys.c.project_id).where(api_keys.c.key_hash == key_hash)

        def work(conn: Connection) -> None:
            existing = conn.execute(query).scalar()
            if existing is None:
                try:
                    with conn.begin_nested():
                        conn.execute(
                            insert(api_keys).values(
                                key_hash=key_hash, project_id=project_id, created_at=now
                            )
                        )
                    return
                except IntegrityError:
                    existing = conn.execute(query).scalar()
                    if existing is None:
                        raise
            if existing != project_id:
                raise Conflict(KEY_CONFLICT)

        self._run(work)

    def project_for_key(self, key_hash: str) -> Project | None:
        query = (
            select(projects.c.id, projects.c.name)
            .join(api_keys, api_keys.c.project_id == projects.c.id)
            .where(api_keys.c.key_hash == key_hash)
        )
        row = self._run(lambda conn: conn.execute(query).first(), write=False)
        return None if row is None else Project(row.id, row.name)

    # -- files -------------------------------------------------------------------------------
    def insert_file(self, file: FileRecord) -> None:
        values = {
            "id": file.id,
            "project_id": file.project_id,
            "filename": file.filename,
            "purpose": file.purpose,
            "bytes": file.bytes,
            "created_at": file.created_at,
            "expires_at": file.expires_at,
            "blob_path": file.blob_path,
            "status": file.status,
            "status_details": file.status_details,
        }
        self._run(lambda conn: conn.execute(insert(files).values(**values)))

    def get_file(self, file_id: str, project_id: str | None = None) -> FileRecord | None:
        query = select(files).where(files.c.id == file_id)
        if project_id is not None:
            query = query.where(files.c.project_id == project_id)
        row = self._run(lambda conn: conn.execute(query).mappings().first(), write=False)
        return None if row is None else file_record(row)

    def list_files(
        self,
        project_id: str,
        *,
        purpose: str | None = None,
        order: str = "desc",
        after: str | None = None,
        limit: int = 10000,
    ) -> Page[FileRecord]:
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be 'asc' or 'desc', not {order!r}")
        query = select(files).where(files.c.project_id == project_id)
        if purpose is not None:
            query = query.where(files.c.purpose == purpose)
        query = query.order_by(files.c.seq.asc() if order == "asc" else files.c.seq.desc())

        def work(conn: Connection) -> Page[FileRecord]:
            q = query
            if after is not None:
                seq = _seq_of(conn, files, after, project_id)
                if seq is None:
                    return Page([], False)
                q = q.where(files.c.seq > seq if order == "asc" else files.c.seq < seq)
            rows = conn.execute(q.limit(limit + 1)).mappings().all()
            return Page([file_record(r) for r in rows[:limit]], len(rows) > limit)

        return self._run(work, write=False)

    def delete_file(self, file_id: str, project_id: str | None = None) -> FileRecord | None:
        where = files.c.id == file_id
        if project_id is not None:
            where = and_(where, files.c.project_id == project_id)

        def work(conn: Connection) -> FileRecord | None:
            row = conn.execute(select(files).where(where)).mappings().first()
            if row is None:
                return None
            conn.execute(sql_delete(files).where(files.c.seq == row["seq"]))
            return file_record(row)

        return self._run(work)

    def expired_files(self, now: int, limit: int) -> list[FileRecord]:
        query = (
            select(files)
            .where(files.c.expires_at.is_not(None), files.c.expires_at <= now)
            .order_by(files.c.expires_at, files.c.seq)
            .limit(limit)
        )
        rows = self._run(lambda conn: conn.execute(query).mappings().all(), write=False)
        return [file_record(r) for r in rows]

    def file_in_use(self, file_id: str) -> bool:
        query = (
            select(batches.c.id)
            .where(
                batches.c.input_file_id == file_id,
                batches.c.status.not_in([s.value for s in TERMINAL]),
            )
            .limit(1)
        )
        return self._run(lambda conn: conn.execute(query).first(), write=False) is not None

    # -- batches -----------------------------------------------------------------------------
    def insert_batch(
        self,
        batch: BatchRecord,
        *,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
    ) -> BatchRecord:
        values = batch_values(batch)
        values.update(idempotency_key=idempotency_key, request_hash=request_hash)
        existing_q = select(batches).where(
            batches.c.project_id == batch.project_id,
            batches.c.idempotency_key == idempotency_key,
        )

        def existing(conn: Connection) -> BatchRecord | None:
            row = conn.execute(existing_q).mappings().first()
            if row is None:
                return None
            if row["request_hash"] != request_hash:
                raise Conflict(IDEMPOTENCY_CONFLICT, param="Idempotency-Key")
            return batch_record(row)

        def work(conn: Connection) -> BatchRecord:
            if idempotency_key is not None:
                found = existing(conn)
                if found is not None:
                    return found
            try:
                with conn.begin_nested():
                    conn.execute(insert(batches).values(**values))
            except IntegrityError:
                found = existing(conn) if idempotency_key is not None else None
                if found is None:
                    raise
                return found
            return batch

        return self._run(work)

    def get_batch(self, batch_id: str, project_id: str | None = None) -> BatchRecord | None:
        query = select(batches).where(batches.c.id == batch_id)
        if project_id is not None:
            query = query.where(batches.c.project_id == project_id)
        row = self._run(lambda conn: conn.execute(query).mappings().first(), write=False)
        return None if row is None else batch_record(row)

    def list_batches(
        self, project_id: str, *, after: str | None = None, limit: int = 20
    ) -> Page[BatchRecord]:
        query = (
            select(batches).where(batches.c.project_id == project_id).order_by(batches.c.seq.desc())
        )

        def work(conn: Connection) -> Page[BatchRecord]:
            q = query
            if after is not None:
                seq = _seq_of(conn, batches, after, project_id)
                if seq is None:
                    return Page([], False)
                q = q.where(batches.c.seq < seq)
            rows = conn.execute(q.limit(limit + 1)).mappings().all()
            return Page([batch_record(r) for r in rows[:limit]], len(rows) > limit)

        return self._run(work, write=False)

    def batches_in(self, statuses: Iterable[BatchStatus], limit: int = 100) -> list[BatchRecord]:
        wanted = [BatchStatus(s).value for s in statuses]
        if not wanted:
            return []
        query = (
            select(batches).where(batches.c.status.in_(wanted)).order_by(batches.c.seq).limit(limit)
        )
        rows = self._run(lambda conn: conn.execute(query).mappings().all(), write=False)
        return [batch_record(r) for r in rows]

    def transition(
        self,
        batch_id: str,
        from_statuses: Iterable[BatchStatus],
        to_status: BatchStatus,
        **fields: Any,
    ) -> BatchRecord | None:
        values = batch_changes(check_batch_fields(fields))
        values["status"] = BatchStatus(to_status).value
        return self._update_batch(batch_id, from_statuses, values)

    def update_batch(
        self, batch_id: str, expect_statuses: Iterable[BatchStatus], **fields: Any
    ) -> BatchRecord | None:
        values = batch_changes(check_batch_fields(fields))
        return self._update_batch(batch_id, expect_statuses, values)

    def _update_batch(
        self, batch_id: str, statuses: Iterable[BatchStatus], values: dict[str, Any]
    ) -> BatchRecord | None:
        wanted = [BatchStatus(s).value for s in statuses]
        where = and_(batches.c.id == batch_id, batches.c.status.in_(wanted))

        def work(conn: Connection) -> BatchRecord | None:
            if values:
                if conn.execute(update(batches).where(where).values(**values)).rowcount != 1:
                    return None
                where_after = batches.c.id == batch_id
            else:
                where_after = where
            row = conn.execute(select(batches).where(where_after)).mappings().first()
            return None if row is None else batch_record(row)

        return self._run(work)

    def start_batch(
        self,
        batch_id: str,
        shards: Sequence[Shard],
        *,
        model: str | None,
        total: int,
        now: int,
    ) -> BatchRecord | None:
        shard_rows = [
            {
                "batch_id": batch_id,
                "idx": s.index,
                "first_line": s.first_line,
                "byte_start": s.start,
                "byte_end": s.end,
                "request_count": s.count,
                "status": ShardStatus.PENDING,
                "lease_owner": None,
                "lease_token": None,
                "lease_expires_at": None,
                "done": 0,
            }
            for s in shards
        ]
        if any(s.batch_id != batch_id for s in shards):
            raise ValueError("every shard must belong to the batch being started")

        def work(conn: Connection) -> BatchRecord | None:
            result = conn.execute(
                update(batches)
                .where(
                    batches.c.id == batch_id,
                    batches.c.status == BatchStatus.VALIDATING.value,
                )
                .values(
                    status=BatchStatus.IN_PROGRESS.value,
                    in_progress_at=now,
                    model=model,
                    total=total,
                )
            )
            if result.rowcount != 1:
                return None
            if shard_rows:
                conn.execute(insert(_shards_table), shard_rows)
            row = conn.execute(select(batches).where(batches.c.id == batch_id)).mappings().one()
            return batch_record(row)

        return self._run(work)


# -- query helpers ----------------------------------------------------------------------
def _seq_of(conn: Connection, table: Any, item_id: str, project_id: str) -> int | None:
    query = select(table.c.seq).where(table.c.id == item_id, table.c.project_id == project_id)
    seq = conn.execute(query).scalar()
    return None if seq is None else int(seq)
