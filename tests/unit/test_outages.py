"""Background duties and a failing store: one warning when an outage begins, one summary line
(with the count) when it ends, no traceback per tick, and back-off in between
(`backfill.outages`, used by the scheduler and worker loops)."""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from polling import poll_async

from backfill.blobs import open_blobs
from backfill.domain.records import BatchRecord, FileRecord
from backfill.domain.statuses import BatchStatus
from backfill.errors import BlobError, BlobNotFound, StoreBusy, StoreError
from backfill.scheduler.scheduler import Scheduler
from backfill.settings import Settings
from backfill.store.memory import MemoryStore
from backfill.worker.worker import Worker

log = logging.getLogger("test.outages")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _messages(caplog: pytest.LogCaptureFixture, logger: str, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and text in r.getMessage()]


def test_an_episode_is_told_once_and_its_end_once_with_the_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from backfill.outages import Outages

    clock = Clock()
    outages = Outages(log, base=0.5, cap=30.0, slack=5.0, clock=clock)
    caplog.set_level(logging.DEBUG, logger="test.outages")
    delays = []
    for _ in range(8):
        assert outages.failed(StoreBusy("database is locked"))
        delays.append(outages.delay)
        clock.now += 1
    assert delays == [0.5, 1, 2, 4, 8, 16, 30, 30]  # doubles, capped
    assert outages.failing
    began = _messages(caplog, "test.outages", "unavailable since")
    assert len(began) == 1 and began[0].startswith("store unavailable since"), began
    assert "1 failure" in began[0] and "StoreBusy: database is locked" in began[0]

    # a success soon after a failure (a read, while writes still fail) ends nothing
    outages.succeeded()
    clock.now += 60
    outages.succeeded()
    assert outages.failing and not _messages(caplog, "test.outages", "available again")
    # nothing failed for 2 * (cap + slack) = 70 s: over
    clock.now += 10
    outages.succeeded()
    ended = _messages(caplog, "test.outages", "available again")
    assert len(ended) == 1 and ended[0].startswith("store available again"), ended
    assert ended[0].endswith("8 failures"), ended
    assert not outages.failing and outages.delay == 0.5
    outages.succeeded()
    assert len(_messages(caplog, "test.outages", "available again")) == 1


def test_what_counts_as_an_outage() -> None:
    from backfill.outages import Outages

    outages = Outages(log, base=1.0, cap=8.0)
    full = BlobError("cannot write x: No space left on device")
    full.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert outages.failed(full)  # its own episode, "blob store"
    assert outages.failed(StoreError("metadata store failed: disk I/O error"))
    assert not outages.failed(BlobNotFound("object x not found"))  # a missing object: a bug
    assert not outages.failed(ValueError("boom"))


class FailingStore(MemoryStore):
    """The in-memory store, with `fail[method]` making that method raise `StoreBusy` (what the
    SQL store raises while another process holds the lock) that many more times."""

    def __init__(self) -> None:
        super().__init__()
        self.fail: dict[str, int] = {}
        self.calls: dict[str, list[float]] = {}
        self.failed: dict[str, list[float]] = {}
        self._guard = threading.Lock()

    def _maybe_fail(self, method: str) -> None:
        with self._guard:
            now = time.monotonic()
            self.calls.setdefault(method, []).append(now)
            if self.fail.get(method, 0) > 0:
                self.fail[method] -= 1
                self.failed.setdefault(method, []).append(now)
                raise StoreBusy("metadata store busy for 5 s (database is locked)")

    def batches_in(self, *args: Any, **kwargs: Any) -> Any:
        self._maybe_fail("batches_in")
        return super().batches_in(*args, **kwargs)

    def claim(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("validate:"):  # a duty's claim, not e.g. the debris collector's
            self._maybe_fail("claim")
        return super().claim(name, *args, **kwargs)

    def lease_shard(self, *args: Any, **kwargs: Any) -> Any:
        self._maybe_fail("lease_shard")
        return super().lease_shard(*args, **kwargs)


def _settings(tmp_path: Path, *, cap: float) -> Settings:
    # quiet = 2 * (cap + slack) = 1.4 s: far longer than any gap between failing retries here
    return Settings(
        data_dir=tmp_path,
        scheduler_interval=0.01,
        outage_backoff_max=cap,
        store_busy_timeout=0.5,
        retention_interval=3600,
    )


def _run_until(loop: Callable[[asyncio.Event], Any], done: Callable[[], bool]) -> None:
    """Run a background loop (`Scheduler.run`, `Worker.run`) until `done()`, with a deadline."""

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(loop(stop))

        def reached(value: bool) -> bool:
            assert value or not task.done(), task  # the loop must not end by itself
            return value

        try:
            await poll_async(done, reached, timeout=20)
        finally:
            stop.set()
            await task

    asyncio.run(main())


def _recovered(caplog: pytest.LogCaptureFixture, logger: str) -> Callable[[], bool]:
    return lambda: bool(_messages(caplog, logger, "available again"))


def _assert_told_once(caplog: pytest.LogCaptureFixture, logger: str, failures: int) -> None:
    began = _messages(caplog, logger, "unavailable since")
    ended = _messages(caplog, logger, "available again")
    assert len(began) == 1 and began[0].startswith("store unavailable since"), began
    assert len(ended) == 1 and ended[0].endswith(f", {failures} failures"), ended
    noisy = [r for r in caplog.records if r.name == logger and r.levelno >= logging.ERROR]
    assert not noisy, [r.getMessage() for r in noisy]  # no traceback per tick


def test_scheduler_loop_tells_an_outage_once_and_backs_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    store = FailingStore()
    store.fail["batches_in"] = 6  # every tick starts with it
    scheduler = Scheduler(
        _settings(tmp_path, cap=0.2), store, open_blobs("memory://", tmp_path), {}
    )
    _run_until(scheduler.run, _recovered(caplog, "backfill.scheduler"))
    _assert_told_once(caplog, "backfill.scheduler", 6)
    failed = store.failed["batches_in"]
    gaps = [b - a for a, b in itertools.pairwise(failed)]
    # waits of 0.01, 0.02, 0.04, 0.08, 0.16 s (each at least that; the timer never fires early)
    assert gaps[-1] >= 0.15, gaps
    assert sum(gaps) >= 0.3, gaps
    # and back to the normal interval once the store answers: many ticks since
    assert len(store.calls["batches_in"]) > 10


def _validating_batch(store: MemoryStore) -> None:
    now = int(time.time())
    store.insert_file(FileRecord("file-in", "proj", "in.jsonl", "batch", 10, now, "files/file-in"))
    store.insert_batch(
        BatchRecord(
            id="batch_stuck",
            project_id="proj",
            endpoint="/v1/chat/completions",
            input_file_id="file-in",
            completion_window="24h",
            status=BatchStatus.VALIDATING,
            created_at=now,
            expires_at=now + 86400,
        )
    )


def test_scheduler_duty_whose_writes_fail_while_reads_work(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What a SQLite write lock held elsewhere looks like: every tick reads fine, every duty's
    first write (its claim) fails. The successful ticks must not end the episode between two
    failing retries (the log would flip every tick), and the duty is retried with back-off,
    not on every tick."""
    caplog.set_level(logging.INFO)
    store = FailingStore()
    _validating_batch(store)
    store.fail["claim"] = 7
    scheduler = Scheduler(
        _settings(tmp_path, cap=0.2), store, open_blobs("memory://", tmp_path), {}
    )
    ticks_then: list[int] = []

    def seen_failures_then_recovery() -> bool:
        if not ticks_then and len(store.failed.get("claim", [])) == 7:
            ticks_then.append(len(store.calls["batches_in"]))
        return _recovered(caplog, "backfill.scheduler")()

    _run_until(scheduler.run, seen_failures_then_recovery)
    _assert_told_once(caplog, "backfill.scheduler", 7)
    failing_ticks = ticks_then[0]
    # 7 claims over many more ticks: the duty waited out its back-off between tries
    assert failing_ticks > 7 + 5, (failing_ticks, store.calls["claim"])
    failed = store.failed["claim"]
    assert failed[-1] - failed[-2] >= 0.15, failed


def test_worker_lease_loop_tells_an_outage_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    store = FailingStore()
    store.fail["lease_shard"] = 5
    worker = Worker(_settings(tmp_path, cap=0.2), store, open_blobs("memory://", tmp_path), {})
    _run_until(worker.run, _recovered(caplog, "backfill.worker"))
    _assert_told_once(caplog, "backfill.worker", 5)
    failed = store.failed["lease_shard"]
    assert failed[-1] - failed[-2] >= 0.07, failed  # waited 0.08 s, not the 0.01 s poll


class FullDisk:
    """Blobs whose reads fail as a full or broken disk makes them (`BlobError`) `left` times."""

    def __init__(self, inner: Any, left: int) -> None:
        self._inner = inner
        self.left = left

    def stream(self, path: str, *args: Any, **kwargs: Any) -> Any:
        if self.left > 0:
            self.left -= 1
            raise BlobError(f"cannot read {path}: No space left on device (os error 28)")
        return self._inner.stream(path, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_scheduler_blob_outage_is_an_episode_of_its_own(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    store = FailingStore()
    _validating_batch(store)
    blobs = FullDisk(open_blobs("memory://", tmp_path), left=4)
    scheduler = Scheduler(_settings(tmp_path, cap=0.2), store, blobs, {})
    _run_until(scheduler.run, _recovered(caplog, "backfill.scheduler"))
    began = _messages(caplog, "backfill.scheduler", "unavailable since")
    ended = _messages(caplog, "backfill.scheduler", "available again")
    assert len(began) == 1 and began[0].startswith("blob store unavailable since"), began
    assert len(ended) == 1 and ended[0].startswith("blob store available again"), ended
    assert ended[0].endswith(", 4 failures"), ended
    assert not _messages(caplog, "backfill.scheduler", "failed; it will be retried")
