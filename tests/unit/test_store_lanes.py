"""`api.responses.call`: store calls run in lanes, so writes blocked on a lock hold up neither
reads nor writes of another kind, and a write that cannot get a thread in time is `StoreBusy`."""

from __future__ import annotations

import threading
import time

import anyio
import anyio.to_thread
import pytest

from backfill.api.responses import READS, WRITE_THREADS, call
from backfill.errors import StoreBusy
from backfill.store.base import Store


class LockedStore:
    """`insert_file` blocks as if another process held the database's write lock."""

    busy_timeout = 0.3

    def __init__(self) -> None:
        self.unlock = threading.Event()
        self.all_blocked = threading.Event()
        self.blocked = 0
        self._count = threading.Lock()

    def insert_file(self, n: int) -> int:
        with self._count:
            self.blocked += 1
            if self.blocked == WRITE_THREADS:
                self.all_blocked.set()
        self.unlock.wait(30)
        return n

    def insert_batch(self, n: int) -> int:
        return n

    def get_file(self, n: int) -> int:
        return n


def test_blocked_writes_hold_up_neither_reads_nor_other_writes() -> None:
    store = LockedStore()
    done: list[int] = []

    async def write(n: int) -> None:
        done.append(await call(store.insert_file, n))

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for n in range(WRITE_THREADS):
                tg.start_soon(write, n)
            assert await anyio.to_thread.run_sync(store.all_blocked.wait, 10)
            try:
                with anyio.fail_after(5):
                    started = time.monotonic()
                    assert await call(store.get_file, 7) == 7
                    assert await call(store.insert_batch, 8) == 8
                    assert time.monotonic() - started < 1.0
                    started = time.monotonic()
                    with pytest.raises(StoreBusy) as busy:
                        await call(store.insert_file, 99)
                    assert 0.25 <= time.monotonic() - started < 2.0
                    assert busy.value.status_code == 503 and busy.value.retry_after >= 1
            finally:
                store.unlock.set()
        assert sorted(done) == list(range(WRITE_THREADS))  # the blocked ones finish afterwards

    anyio.run(main)


def test_reads_are_store_methods() -> None:
    """A renamed read would silently move to a write lane: keep the list honest."""
    assert set(dir(Store)) >= READS, READS - set(dir(Store))
