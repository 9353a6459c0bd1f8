"""The fault tier's harness: the real composition root (`Service`: scheduler, worker, dispatcher,
the OpenAI engine over HTTP to the echo upstream) on a real SQLite file or a scratch PostgreSQL
database and the local blob store, with faults injected at the store and blob seams.

Faults are injected by wrapping the real backends (`FlakyStore`, `FlakyBlobs`): a chosen method
raises the error its backend raises when the database is locked or the disk is full, a chosen
number of times, then the real call goes through. A batch is submitted straight into the store
(the API is not under test here) and run to its end; `Outcome` holds what a user downloads.

`check_invariant` is the tier's one assertion: every `custom_id` exactly once across the output
and error files, counts that add up, and no `batch_expired` / `batch_cancelled` line unless the
batch expired or was cancelled.
"""

from __future__ import annotations

import errno
import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psycopg
from polling import poll_async

from backfill.domain.ids import new_batch_id, new_file_id
from backfill.domain.records import BatchRecord, FileRecord
from backfill.domain.statuses import BatchStatus
from backfill.errors import BlobError, StoreError
from backfill.service import Service
from backfill.settings import ModelConfig, Settings
from backfill.testing.postgres import libpq_url, scratch_postgres_database

MODEL = "echo"
CHAT = "/v1/chat/completions"
TERMINAL = {BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED, BatchStatus.FAILED}


def chat_line(custom_id: str, text: str, **body: Any) -> bytes:
    payload = {"model": MODEL, "messages": [{"role": "user", "content": text}], **body}
    line = {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": payload}
    return json.dumps(line, separators=(",", ":")).encode()  # any depth, unlike orjson


class FlakyStore:
    """The real store, with `fail(method, times)` making that method raise `StoreError` (what
    the SQL store raises for "database is locked") the next `times` calls."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._plan: dict[str, int] = {}
        self.failures: dict[str, int] = {}
        self._lock = threading.Lock()

    def fail(self, method: str, times: int) -> None:
        with self._lock:
            self._plan[method] = times

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                left = self._plan.get(name, 0)
                if left > 0:
                    self._plan[name] = left - 1
                    self.failures[name] = self.failures.get(name, 0) + 1
                    raise StoreError("metadata store failed: database is locked")
            return attr(*args, **kwargs)

        return call


class FlakyBlobs:
    """The real blob store, with `fail_segments(times)` making segment writes raise the
    `BlobError` a full disk gives (ENOSPC) the next `times` calls."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.segment_failures_left = 0
        self.segment_failures = 0

    def fail_segments(self, times: int) -> None:
        self.segment_failures_left = times

    async def put(self, path: str, data: bytes) -> None:
        if "/seg/" in path and self.segment_failures_left > 0:
            self.segment_failures_left -= 1
            self.segment_failures += 1
            cause = OSError(errno.ENOSPC, "No space left on device")
            raise BlobError(f"cannot write {path}: {cause}") from cause
        await self._inner.put(path, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@dataclass
class Outcome:
    batch: BatchRecord
    output: list[dict[str, Any]]
    errors: list[dict[str, Any]]

    def by_id(self) -> dict[str, dict[str, Any]]:
        return {line["custom_id"]: line for line in self.output + self.errors}

    def error_code(self, custom_id: str) -> str | None:
        for line in self.errors:
            if line["custom_id"] == custom_id:
                err = line.get("error")
                return err["code"] if err else None
        return None


@contextmanager
def sqlite_write_lock(db: Path) -> Iterator[None]:
    """Hold SQLite's one write lock from another connection (another process, as the server
    sees it)."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=30, check_same_thread=False)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


@contextmanager
def postgres_table_lock(url: str, table: str) -> Iterator[None]:
    """EXCLUSIVE blocks every write to the table (and row locks on it) but not plain reads."""
    with psycopg.connect(libpq_url(url)) as conn:
        conn.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")
        yield
        conn.rollback()


@contextmanager
def database_url(kind: str, tmp: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp / 'store.db'}"
    else:
        with scratch_postgres_database() as url:
            yield url


class Rig:
    """One `Service` with flaky store and blobs, run in the test's event loop."""

    def __init__(
        self, tmp: Path, database: str, upstream_url: str, *, blobs_dir: Path | None = None,
        **settings: Any,
    ) -> None:  # fmt: skip
        model = {"name": MODEL, "url": upstream_url, "attempts": 3, "timeout": 30.0}
        model.update(settings.pop("model", {}))
        defaults: dict[str, Any] = {
            "data_dir": tmp,
            "database": database,
            "storage": str(blobs_dir) if blobs_dir is not None else None,
            "models": [ModelConfig(**model)],
            "default_model": False,
            "shard_size": 10,
            "flush_every_requests": 5,
            "flush_every_seconds": 0.05,
            "scheduler_interval": 0.05,
            "lease_seconds": 10.0,
            "cancel_grace_seconds": 5.0,
        }
        self.settings = Settings(**{**defaults, **settings})
        self.service = Service(self.settings)
        self.store = FlakyStore(self.service.store)
        self.blobs = FlakyBlobs(self.service.blobs)
        self.service.store = self.store  # type: ignore[assignment]
        self.service.blobs = self.blobs  # type: ignore[assignment]
        self.project = self.service.store.ensure_project("default")

    async def submit(self, lines: list[bytes]) -> str:
        data = b"\n".join(lines) + b"\n"
        file_id = new_file_id()
        path = f"files/{file_id}"
        await self.blobs.put(path, data)
        now = int(self.settings_clock())
        self.store.insert_file(
            FileRecord(file_id, self.project.id, "in.jsonl", "batch", len(data), now, path)
        )
        batch = BatchRecord(
            id=new_batch_id(),
            project_id=self.project.id,
            endpoint=CHAT,
            input_file_id=file_id,
            completion_window="24h",
            status=BatchStatus.VALIDATING,
            created_at=now,
            expires_at=now + 86400,
        )
        return str(self.store.insert_batch(batch).id)

    @staticmethod
    def settings_clock() -> float:
        import time

        return time.time()

    def batch(self, batch_id: str) -> BatchRecord:
        batch = self.store.get_batch(batch_id)
        assert batch is not None
        return batch

    async def wait_done(self, batch_id: str, timeout: float = 90.0) -> BatchRecord:
        return await poll_async(
            lambda: self.batch(batch_id),
            lambda batch: batch.status in TERMINAL,
            what=f"batch {batch_id} to finish",
            timeout=timeout,
        )

    async def outcome(self, batch_id: str) -> Outcome:
        batch = self.batch(batch_id)
        return Outcome(
            batch,
            await self._lines(batch.output_file_id),
            await self._lines(batch.error_file_id),
        )

    async def _lines(self, file_id: str | None) -> list[dict[str, Any]]:
        if file_id is None:
            return []
        file = self.store.get_file(file_id)
        assert file is not None
        data = b"".join([chunk async for chunk in self.blobs.stream(file.blob_path)])
        return [orjson.loads(line) for line in data.splitlines() if line.strip()]

    def close(self) -> None:
        self.service.close()


def check_invariant(outcome: Outcome, custom_ids: list[str]) -> None:
    """Every custom_id exactly once, counts that add up, no invented expiry or cancel."""
    seen = [line["custom_id"] for line in outcome.output + outcome.errors]
    assert sorted(seen) == sorted(custom_ids), "each custom_id exactly once"
    batch = outcome.batch
    assert batch.total == len(custom_ids)
    assert batch.completed == len(outcome.output), (batch.completed, len(outcome.output))
    assert batch.failed == len(outcome.errors), (batch.failed, len(outcome.errors))
    assert batch.completed + batch.failed == batch.total
    for line in outcome.output:
        assert line["error"] is None and line["response"]["status_code"] == 200
    codes = {(line.get("error") or {}).get("code") for line in outcome.errors}
    if batch.status is not BatchStatus.EXPIRED:
        assert "batch_expired" not in codes
    if batch.status is not BatchStatus.CANCELLED:
        assert "batch_cancelled" not in codes
