"""`Store` over SQLAlchemy Core 2.x, for SQLite (the default) and PostgreSQL.

Design decisions:
- One method, one short transaction, run through `_run`, which is also the seam where every
  SQLAlchemy/driver exception becomes a `StoreError` (our own `BackfillError`s, e.g. the
  idempotency `Conflict`, pass through untouched). PostgreSQL deadlocks and serialization
  failures are retried a few times, since each unit of work is a pure function of its inputs.
- State changes are conditional UPDATEs (`WHERE status IN (...)`, `WHERE lease_token = ... AND
  status = 'leased'`); the rowcount tells the caller whether it won. This is what makes many
  schedulers and workers on one database safe without any other coordination.
- SQLite: the pysqlite driver's own transaction handling is switched off (`isolation_level =
  None`) and we emit `BEGIN IMMEDIATE` for writing transactions, so a transaction that reads
  and then writes holds the write lock from its first statement and can never fail with
  SQLITE_BUSY on a lock upgrade; it waits (busy_timeout 30 s) instead. Read-only methods run
  on an engine view with the `backfill_read_only` execution option and get a plain deferred
  `BEGIN`, which under WAL never blocks writers. `synchronous=NORMAL` is durable against
  process crashes (all that WAL needs); a power cut may lose the last commits, which the lease
  protocol tolerates (the work is redone).
- PostgreSQL: leasing is `SELECT ... FOR UPDATE OF shards SKIP LOCKED`, so concurrent workers
  never wait on each other and never get the same shard; `OF shards` keeps the batch row
  unlocked. Migrations take a transaction-scoped advisory lock so many processes can start at
  once (on SQLite, `BEGIN IMMEDIATE` does the same); within one process a thread lock guards
  Alembic's global state. `postgresql://` URLs are rewritten to the psycopg 3 driver.
- Queries use nothing dialect-specific beyond `with_for_update` (ignored by SQLite).
- Idempotent inserts select first, then insert inside a SAVEPOINT; losing a race on the unique
  constraint rolls back only the savepoint and re-reads the winner's row.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    Engine,
    Select,
    and_,
    create_engine,
    event,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy import (
    delete as sql_delete,
)
from sqlalchemy.engine import URL, RowMapping, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from backfill.domain.ids import new_project_id
from backfill.domain.records import (
    BatchError,
    BatchRecord,
    FileRecord,
    Project,
    Segment,
    Shard,
    ShardStatus,
    Usage,
)
from backfill.domain.statuses import TERMINAL, BatchStatus
from backfill.errors import BackfillError, Conflict, StoreError
from backfill.store.base import Page
from backfill.store.rules import IDEMPOTENCY_CONFLICT, KEY_CONFLICT, check_batch_fields
from backfill.store.schema import api_keys, batches, files, projects, segments
from backfill.store.schema import shards as _shards_table  # `shards` is also a method name

T = TypeVar("T")

MIGRATIONS = Path(__file__).parent / "migrations"
READ_ONLY = "backfill_read_only"
# pg_advisory_xact_lock key for schema migrations (any fixed 64-bit number).
MIGRATION_LOCK_KEY = 0x6261636B66696C6C  # "backfill"
# Alembic keeps its migration context in module globals, so two threads of one process must
# not run it at once; the database lock below serializes processes.
_MIGRATION_THREAD_LOCK = threading.Lock()
_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})  # serialization failure, deadlock
_USAGE_COLUMNS = ("input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens")


def normalize_url(url: str) -> URL:
    """`postgres(ql)://` means psycopg 3 (the installed driver); everything else as given."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            url = "postgresql+psycopg://" + url[len(prefix) :]
    return make_url(url)


class SqlStore:
    def __init__(self, url: str, *, pool_size: int = 5, max_overflow: int = 20) -> None:
        self.url = normalize_url(url)
        self._engine = _create_engine(self.url, pool_size=pool_size, max_overflow=max_overflow)
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
        return None if row is None else _file(row)

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
            return Page([_file(r) for r in rows[:limit]], len(rows) > limit)

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
            return _file(row)

        return self._run(work)

    def expired_files(self, now: int, limit: int) -> list[FileRecord]:
        query = (
            select(files)
            .where(files.c.expires_at.is_not(None), files.c.expires_at <= now)
            .order_by(files.c.expires_at, files.c.seq)
            .limit(limit)
        )
        rows = self._run(lambda conn: conn.execute(query).mappings().all(), write=False)
        return [_file(r) for r in rows]

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
        values = _batch_values(batch)
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
            return _batch(row)

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
        return None if row is None else _batch(row)

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
            return Page([_batch(r) for r in rows[:limit]], len(rows) > limit)

        return self._run(work, write=False)

    def batches_in(self, statuses: Iterable[BatchStatus], limit: int = 100) -> list[BatchRecord]:
        wanted = [BatchStatus(s).value for s in statuses]
        if not wanted:
            return []
        query = (
            select(batches).where(batches.c.status.in_(wanted)).order_by(batches.c.seq).limit(limit)
        )
        rows = self._run(lambda conn: conn.execute(query).mappings().all(), write=False)
        return [_batch(r) for r in rows]

    def transition(
        self,
        batch_id: str,
        from_statuses: Iterable[BatchStatus],
        to_status: BatchStatus,
        **fields: Any,
    ) -> BatchRecord | None:
        values = _batch_changes(check_batch_fields(fields))
        values["status"] = BatchStatus(to_status).value
        return self._update_batch(batch_id, from_statuses, values)

    def update_batch(
        self, batch_id: str, expect_statuses: Iterable[BatchStatus], **fields: Any
    ) -> BatchRecord | None:
        values = _batch_changes(check_batch_fields(fields))
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
            return None if row is None else _batch(row)

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
            return _batch(row)

        return self._run(work)

    # -- shards and leases -------------------------------------------------------------------
    def lease_shard(self, owner: str, token: str, now: float, lease_seconds: float) -> Shard | None:
        eligible = and_(
            batches.c.status == BatchStatus.IN_PROGRESS.value,
            batches.c.stop_reason.is_(None),
            or_(
                _shards_table.c.status == ShardStatus.PENDING,
                and_(
                    _shards_table.c.status == ShardStatus.LEASED,
                    _shards_table.c.lease_expires_at < now,
                ),
            ),
        )
        pick: Select[Any] = (
            select(_shards_table.c.batch_id, _shards_table.c.idx)
            .join(batches, batches.c.id == _shards_table.c.batch_id)
            .where(eligible)
            .order_by(batches.c.seq, _shards_table.c.idx)
            .limit(1)
            .with_for_update(skip_locked=True, of=_shards_table)
        )
        expires = now + lease_seconds

        def work(conn: Connection) -> Shard | None:
            # A pick can lose a race on PostgreSQL only in exotic interleavings (the row changed
            # between snapshot and lock); the guarded UPDATE detects it and we pick again.
            for _ in range(10):
                picked = conn.execute(pick).first()
                if picked is None:
                    return None
                key = _shard_key(picked.batch_id, picked.idx)
                still_free = or_(
                    _shards_table.c.status == ShardStatus.PENDING,
                    and_(
                        _shards_table.c.status == ShardStatus.LEASED,
                        _shards_table.c.lease_expires_at < now,
                    ),
                )
                result = conn.execute(
                    update(_shards_table)
                    .where(key, still_free)
                    .values(
                        status=ShardStatus.LEASED,
                        lease_owner=owner,
                        lease_token=token,
                        lease_expires_at=expires,
                    )
                )
                if result.rowcount == 1:
                    row = conn.execute(select(_shards_table).where(key)).mappings().one()
                    return _shard(row)
            return None

        return self._run(work)

    def renew_lease(
        self, batch_id: str, index: int, token: str, now: float, lease_seconds: float
    ) -> bool:
        return self._fenced(batch_id, index, token, {"lease_expires_at": now + lease_seconds})

    def record_segment(self, segment: Segment, token: str) -> bool:
        fence = _fence(segment.batch_id, segment.shard_index, token)
        n = segment.completed + segment.failed
        u = segment.usage

        def work(conn: Connection) -> bool:
            shard_update = update(_shards_table).where(fence).values(done=_shards_table.c.done + n)
            if conn.execute(shard_update).rowcount != 1:
                return False
            conn.execute(
                insert(segments).values(
                    batch_id=segment.batch_id,
                    shard_index=segment.shard_index,
                    seq=segment.seq,
                    blob_path=segment.blob_path,
                    completed=segment.completed,
                    failed=segment.failed,
                    input_tokens=u.input_tokens,
                    cached_tokens=u.cached_tokens,
                    output_tokens=u.output_tokens,
                    reasoning_tokens=u.reasoning_tokens,
                )
            )
            conn.execute(
                update(batches)
                .where(batches.c.id == segment.batch_id)
                .values(
                    completed=batches.c.completed + segment.completed,
                    failed=batches.c.failed + segment.failed,
                    input_tokens=batches.c.input_tokens + u.input_tokens,
                    cached_tokens=batches.c.cached_tokens + u.cached_tokens,
                    output_tokens=batches.c.output_tokens + u.output_tokens,
                    reasoning_tokens=batches.c.reasoning_tokens + u.reasoning_tokens,
                )
            )
            return True

        return self._run(work)

    def finish_shard(self, batch_id: str, index: int, token: str) -> bool:
        return self._fenced(batch_id, index, token, _ended(ShardStatus.DONE))

    def release_shard(self, batch_id: str, index: int, token: str) -> bool:
        return self._fenced(batch_id, index, token, _ended(ShardStatus.PENDING))

    def _fenced(self, batch_id: str, index: int, token: str, values: dict[str, Any]) -> bool:
        statement = update(_shards_table).where(_fence(batch_id, index, token)).values(**values)
        return self._run(lambda conn: conn.execute(statement).rowcount == 1)

    def shards(self, batch_id: str) -> list[Shard]:
        query = (
            select(_shards_table)
            .where(_shards_table.c.batch_id == batch_id)
            .order_by(_shards_table.c.idx)
        )
        rows = self._run(lambda conn: conn.execute(query).mappings().all(), write=False)
        return [_shard(r) for r in rows]

    def segments(self, batch_id: str, index: int | None = None) -> list[Segment]:
        query = select(segments).where(segments.c.batch_id == batch_id)
        if index is not None:
            query = query.where(segments.c.shard_index == index)
        query = query.order_by(segments.c.shard_index, segments.c.seq)
        rows = self._run(lambda conn: conn.execute(query).mappings().all(), write=False)
        return [_segment(r) for r in rows]

    def usage_of(self, batch_id: str) -> Usage:
        query = select(*(func.coalesce(func.sum(segments.c[c]), 0) for c in _USAGE_COLUMNS)).where(
            segments.c.batch_id == batch_id
        )
        row = self._run(lambda conn: conn.execute(query).one(), write=False)
        return Usage(*(int(v) for v in row))


# -- engine --------------------------------------------------------------------------------
def _create_engine(url: URL, *, pool_size: int, max_overflow: int) -> Engine:
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
                cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        read_only = conn.get_execution_options().get(READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


# -- rows <-> records ----------------------------------------------------------------------
def _seq_of(conn: Connection, table: Any, item_id: str, project_id: str) -> int | None:
    query = select(table.c.seq).where(table.c.id == item_id, table.c.project_id == project_id)
    seq = conn.execute(query).scalar()
    return None if seq is None else int(seq)


def _shard_key(batch_id: str, index: int) -> Any:
    return and_(_shards_table.c.batch_id == batch_id, _shards_table.c.idx == index)


def _fence(batch_id: str, index: int, token: str) -> Any:
    return and_(
        _shard_key(batch_id, index),
        _shards_table.c.lease_token == token,
        _shards_table.c.status == ShardStatus.LEASED,
    )


def _ended(status: str) -> dict[str, Any]:
    return {
        "status": status,
        "lease_owner": None,
        "lease_token": None,
        "lease_expires_at": None,
    }


def _file(row: RowMapping) -> FileRecord:
    return FileRecord(
        id=row["id"],
        project_id=row["project_id"],
        filename=row["filename"],
        purpose=row["purpose"],
        bytes=int(row["bytes"]),
        created_at=int(row["created_at"]),
        blob_path=row["blob_path"],
        expires_at=_int_or_none(row["expires_at"]),
        status=row["status"],
        status_details=row["status_details"],
    )


_BATCH_TIMES = (
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


def _batch(row: RowMapping) -> BatchRecord:
    errors = row["errors"]
    metadata = row["metadata"]
    return BatchRecord(
        id=row["id"],
        project_id=row["project_id"],
        endpoint=row["endpoint"],
        input_file_id=row["input_file_id"],
        completion_window=row["completion_window"],
        status=BatchStatus(row["status"]),
        created_at=int(row["created_at"]),
        expires_at=int(row["expires_at"]),
        model=row["model"],
        output_file_id=row["output_file_id"],
        error_file_id=row["error_file_id"],
        total=int(row["total"]),
        completed=int(row["completed"]),
        failed=int(row["failed"]),
        usage=Usage(*(int(row[c]) for c in _USAGE_COLUMNS)),
        metadata=None if metadata is None else dict(metadata),
        errors=None if errors is None else tuple(BatchError(**e) for e in errors),
        output_expires_after=_int_or_none(row["output_expires_after"]),
        stop_reason=row["stop_reason"],
        **{name: _int_or_none(row[name]) for name in _BATCH_TIMES},
    )


def _batch_values(batch: BatchRecord) -> dict[str, Any]:
    values: dict[str, Any] = {
        "id": batch.id,
        "project_id": batch.project_id,
        "status": BatchStatus(batch.status).value,
        "created_at": batch.created_at,
    }
    changes = {
        name: getattr(batch, name)
        for name in (
            "endpoint",
            "input_file_id",
            "completion_window",
            "expires_at",
            "model",
            "output_file_id",
            "error_file_id",
            "total",
            "completed",
            "failed",
            "usage",
            "metadata",
            "errors",
            "output_expires_after",
            "stop_reason",
            *_BATCH_TIMES,
        )
    }
    values.update(_batch_changes(check_batch_fields(changes)))
    return values


def _batch_changes(changes: Mapping[str, Any]) -> dict[str, Any]:
    """Normalized `BatchRecord` field changes -> column values."""
    values: dict[str, Any] = {}
    for name, value in changes.items():
        if name == "usage":
            values.update({c: getattr(value, c) for c in _USAGE_COLUMNS})
        elif name == "errors":
            values["errors"] = None if value is None else [e.to_dict() for e in value]
        else:
            values[name] = value
    return values


def _shard(row: RowMapping) -> Shard:
    return Shard(
        batch_id=row["batch_id"],
        index=int(row["idx"]),
        first_line=int(row["first_line"]),
        start=int(row["byte_start"]),
        end=int(row["byte_end"]),
        count=int(row["request_count"]),
        status=row["status"],
        lease_owner=row["lease_owner"],
        lease_token=row["lease_token"],
        lease_expires_at=row["lease_expires_at"],
        done=int(row["done"]),
    )


def _segment(row: RowMapping) -> Segment:
    return Segment(
        batch_id=row["batch_id"],
        shard_index=int(row["shard_index"]),
        seq=int(row["seq"]),
        blob_path=row["blob_path"],
        completed=int(row["completed"]),
        failed=int(row["failed"]),
        usage=Usage(*(int(row[c]) for c in _USAGE_COLUMNS)),
    )


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)
