"""`Store` over SQLAlchemy Core 2.x, for SQLite (the default) and PostgreSQL.

Design decisions:
- One method, one short transaction, run through `_run`, which is also the seam where every
  SQLAlchemy/driver exception becomes a `StoreError` (our own `BackfillError`s, e.g. the
  idempotency `Conflict`, pass through untouched), except text no database can store (a NUL,
  which only PostgreSQL refuses, or a lone surrogate), which becomes `InvalidRequest`: a
  backstop, since the API refuses such text first (`api/text.py`). PostgreSQL deadlocks and
  serialization failures are retried a few times, since each unit of work is a pure function
  of its inputs.
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
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    Engine,
    and_,
    func,
    insert,
    select,
    text,
    union,
    update,
)
from sqlalchemy import delete as sql_delete
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    IntegrityError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout

from backfill.domain.ids import new_key_id, new_project_id
from backfill.domain.records import (
    BatchRecord,
    FileRecord,
    Project,
    Shard,
    ShardStatus,
)
from backfill.domain.statuses import TERMINAL, BatchStatus
from backfill.errors import BackfillError, Conflict, InvalidRequest, StoreBusy, StoreError
from backfill.store.base import ApiKey, Page
from backfill.store.engine import PATIENCE, create_store_engines, normalize_url
from backfill.store.rows import (
    batch_changes,
    batch_record,
    batch_values,
    file_record,
)
from backfill.store.rules import (
    IDEMPOTENCY_CONFLICT,
    KEY_CONFLICT,
    check_batch_fields,
    check_transition,
)
from backfill.store.schema import api_keys, batches, files, projects, segments
from backfill.store.schema import shards as _shards_table  # `shards` is also a method name
from backfill.store.sql_peaks import SqlPeaksMixin
from backfill.store.sql_projects import (
    SqlProjectsMixin,
    check_active_batches,
    check_token_limit,
)
from backfill.store.sql_usage import SqlUsageMixin
from backfill.store.sql_webhooks import SqlWebhooksMixin, enqueue_batch_event
from backfill.store.sql_work import SqlWorkMixin

T = TypeVar("T")

MIGRATIONS = Path(__file__).parent / "migrations"
# pg_advisory_xact_lock key for schema migrations (any fixed 64-bit number).
MIGRATION_LOCK_KEY = 0x6261636B66696C6C  # "backfill"
# Alembic keeps its migration context in module globals, so two threads of one process must
# not run it at once; the database lock below serializes processes.
_MIGRATION_THREAD_LOCK = threading.Lock()
_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})  # serialization failure, deadlock
_BUSY_SQLSTATES = frozenset({"55P03"})  # lock_not_available: lock_timeout ran out
# Many processes may start (and migrate) at once; the first one's migration may take a while.
MIGRATION_PATIENCE = 120.0
_BAD_TEXT = "The request holds text no database can store (a NUL character or invalid Unicode)."


def _unreachable(exc: DBAPIError, sqlstate: str | None) -> bool:
    """PostgreSQL could not be reached or is shutting down: as good as busy for a client (503,
    retry later), not a server error. A failed connect carries no SQLSTATE; class 08 is a
    connection exception; 57P01-57P03 are admin shutdown, crash shutdown, cannot connect now."""
    if exc.connection_invalidated or (sqlstate is None and isinstance(exc, OperationalError)):
        return True
    return sqlstate is not None and (sqlstate.startswith("08") or sqlstate in _SHUTDOWN)


_SHUTDOWN = frozenset({"57P01", "57P02", "57P03"})


_TERMINAL_VALUES = frozenset(s.value for s in TERMINAL)


class SqlStore(SqlWorkMixin, SqlWebhooksMixin, SqlUsageMixin, SqlProjectsMixin, SqlPeaksMixin):
    def __init__(
        self, url: str, *, pool_size: int = 5, max_overflow: int = 20, busy_timeout: float = 5.0
    ) -> None:
        self.url = normalize_url(url)
        #: seconds a call may wait for a lock or a pooled connection before `StoreBusy`
        self.busy_timeout = busy_timeout
        self._engine, self._read_engine = create_store_engines(
            self.url, pool_size=pool_size, max_overflow=max_overflow, busy_timeout=busy_timeout
        )
        self._postgres = self._engine.dialect.name == "postgresql"

    def __repr__(self) -> str:
        return f"SqlStore({self.url.render_as_string(hide_password=True)})"

    @property
    def engine(self) -> Engine:
        return self._engine

    # -- plumbing ----------------------------------------------------------------------------
    def _run(
        self, work: Callable[[Connection], T], *, write: bool = True, patience: float | None = None
    ) -> T:
        engine = self._engine if write else self._read_engine
        if patience is not None:
            engine = engine.execution_options(**{PATIENCE: patience})
        for attempt in itertools.count():
            try:
                with engine.begin() as conn:
                    return work(conn)
            except BackfillError:
                raise
            except DBAPIError as exc:
                if _busy(exc):
                    reason = (str(exc.orig).splitlines() or ["locked"])[0]
                    raise self._busy(f"lock not granted: {reason}") from exc
                sqlstate = getattr(exc.orig, "sqlstate", None)
                if sqlstate in _RETRYABLE_SQLSTATES and attempt < 5:
                    continue
                if self._postgres and _unreachable(exc, sqlstate):
                    raise self._busy("database unreachable") from exc
                if isinstance(exc, DataError) and "NUL" in str(exc.orig):
                    raise InvalidRequest(_BAD_TEXT) from exc  # backstop: the API checks first
                raise StoreError(f"metadata store failed: {exc.orig}") from exc
            except UnicodeEncodeError as exc:  # a lone surrogate, on either database
                raise InvalidRequest(_BAD_TEXT) from exc
            except PoolTimeout as exc:
                raise self._busy(f"no free database connection: {exc}") from exc
            except SQLAlchemyError as exc:
                raise StoreError(f"metadata store failed: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _busy(self, why: str) -> StoreBusy:
        return StoreBusy(
            f"metadata store busy for {self.busy_timeout:g} s ({why})",
            retry_after=max(1.0, self.busy_timeout),
        )

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
                self._run(work, patience=MIGRATION_PATIENCE)
        except CommandError as exc:
            raise StoreError(f"schema migration failed: {exc}") from exc

    def close(self) -> None:
        self._engine.dispose()
        self._read_engine.dispose()

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

    def add_api_key(
        self,
        project_id: str,
        key_hash: str,
        now: int,
        *,
        prefix: str | None = None,
        source: str = "cli",
        admin: bool = False,
    ) -> None:
        query = select(api_keys.c.project_id).where(api_keys.c.key_hash == key_hash)
        row = {
            "key_hash": key_hash,
            "project_id": project_id,
            "created_at": now,
            "id": new_key_id(),
            "prefix": prefix,
            "source": source,
            "admin": admin,
        }

        def work(conn: Connection) -> None:
            existing = conn.execute(query).scalar()
            if existing is None:
                try:
                    with conn.begin_nested():
                        conn.execute(insert(api_keys).values(**row))
                    return
                except IntegrityError:
                    existing = conn.execute(query).scalar()
                    if existing is None:
                        raise
            if existing != project_id:
                raise Conflict(KEY_CONFLICT)
            if source == "flag":  # given at serve start: a flag key, valid while given
                conn.execute(
                    update(api_keys)
                    .where(api_keys.c.key_hash == key_hash)
                    .values(
                        source="flag",
                        revoked_at=None,
                        prefix=func.coalesce(api_keys.c.prefix, prefix),
                    )
                )

        self._run(work)

    def project_for_key(self, key_hash: str) -> Project | None:
        query = (
            select(projects.c.id, projects.c.name, api_keys.c.id.label("key_id"), api_keys.c.admin)
            .join(api_keys, api_keys.c.project_id == projects.c.id)
            .where(api_keys.c.key_hash == key_hash, api_keys.c.revoked_at.is_(None))
        )
        row = self._run(lambda conn: conn.execute(query).first(), write=False)
        return None if row is None else Project(row.id, row.name, row.key_id, bool(row.admin))

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
            check_active_batches(conn, batch.project_id)  # the project's cap, in this transaction
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
        sources, target = check_transition(from_statuses, to_status)
        values["status"] = target.value
        return self._update_batch(batch_id, sources, values)

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
            if row is None:
                return None
            if values.get("status") in _TERMINAL_VALUES:
                enqueue_batch_event(conn, row, time.time())  # the outbox, in this transaction
            return batch_record(row)

        return self._run(work)

    def start_batch(
        self,
        batch_id: str,
        shards: Sequence[Shard],
        *,
        model: str | None,
        total: int,
        now: int,
        enqueued_tokens: int | None = None,
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
            if enqueued_tokens is not None:
                project_id = conn.execute(
                    select(batches.c.project_id).where(batches.c.id == batch_id)
                ).scalar()
                if project_id is not None:  # the project's token limit, in this transaction
                    check_token_limit(conn, project_id, batch_id, model, enqueued_tokens)
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
                    enqueued_tokens=enqueued_tokens,
                )
            )
            if result.rowcount != 1:
                return None
            if shard_rows:
                conn.execute(insert(_shards_table), shard_rows)
            row = conn.execute(select(batches).where(batches.c.id == batch_id)).mappings().one()
            return batch_record(row)

        return self._run(work)

    # -- keys: listing and revocation ---------------------------------------------------------
    _KEY_COLUMNS = (
        api_keys.c.id,
        api_keys.c.project_id,
        projects.c.name,
        api_keys.c.prefix,
        api_keys.c.source,
        api_keys.c.created_at,
        api_keys.c.revoked_at,
        api_keys.c.admin,
    )

    def _keys_where(self, conn: Connection, *where: Any) -> list[ApiKey]:
        query = (
            select(*self._KEY_COLUMNS)
            .join(projects, projects.c.id == api_keys.c.project_id, isouter=True)
            .where(*where)
            .order_by(api_keys.c.created_at, api_keys.c.id)
        )
        return [
            ApiKey(
                r.id,
                r.project_id,
                r.name or "",
                r.prefix,
                r.source,
                r.created_at,
                r.revoked_at,
                admin=bool(r.admin),
            )
            for r in conn.execute(query)
        ]

    def list_api_keys(self, project: str | None = None) -> list[ApiKey]:
        where = [] if project is None else [projects.c.name == project]
        return self._run(lambda conn: self._keys_where(conn, *where), write=False)

    def revoke_api_key(self, key_id: str, now: int) -> ApiKey | None:
        def work(conn: Connection) -> ApiKey | None:
            conn.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            found = self._keys_where(conn, api_keys.c.id == key_id)
            return found[0] if found else None

        return self._run(work)

    def revoke_flag_keys(self, keep: Collection[str], now: int) -> list[ApiKey]:
        where = [api_keys.c.source == "flag", api_keys.c.revoked_at.is_(None)]
        if keep:
            where.append(api_keys.c.key_hash.not_in(list(keep)))

        def work(conn: Connection) -> list[ApiKey]:
            ids = list(conn.execute(select(api_keys.c.id).where(*where)).scalars())
            if not ids:
                return []
            conn.execute(
                update(api_keys)
                .where(api_keys.c.id.in_(ids), api_keys.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            return self._keys_where(conn, api_keys.c.id.in_(ids))

        return self._run(work)

    # -- debris of finished batches -----------------------------------------------------------
    def terminal_batches_with_segments(self, limit: int) -> list[str]:
        # From the rows' side: shards and segments hold only the batches not yet collected
        # (running ones, and debris), while terminal batches pile up forever.
        owning = union(select(_shards_table.c.batch_id), select(segments.c.batch_id))
        query = (
            select(batches.c.id)
            .where(
                batches.c.id.in_(owning.scalar_subquery()),
                batches.c.status.in_([st.value for st in TERMINAL]),
            )
            .order_by(batches.c.seq)
            .limit(limit)
        )
        return self._run(lambda conn: list(conn.execute(query).scalars()), write=False)

    def delete_segments(self, batch_id: str) -> int:
        terminal = (
            select(batches.c.id)
            .where(
                batches.c.id == batch_id,
                batches.c.status.in_([st.value for st in TERMINAL]),
            )
            .exists()
        )

        def work(conn: Connection) -> int:
            gone = conn.execute(
                sql_delete(segments).where(segments.c.batch_id == batch_id, terminal)
            ).rowcount
            gone += conn.execute(
                sql_delete(_shards_table).where(_shards_table.c.batch_id == batch_id, terminal)
            ).rowcount
            return int(gone)

        return self._run(work)


# -- query helpers ----------------------------------------------------------------------
def _busy(exc: DBAPIError) -> bool:
    """The database answered, but a lock was not to be had within the busy timeout."""
    if getattr(exc.orig, "sqlstate", None) in _BUSY_SQLSTATES:
        return True
    code = getattr(exc.orig, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF == sqlite3.SQLITE_BUSY


def _seq_of(conn: Connection, table: Any, item_id: str, project_id: str) -> int | None:
    query = select(table.c.seq).where(table.c.id == item_id, table.c.project_id == project_id)
    seq = conn.execute(query).scalar()
    return None if seq is None else int(seq)
