"""The debris collector on every store backend with the local blob store: what crashes leave
behind goes, what is in use stays.

The staging debris is real: a child process streams an upload into the blob folder and is
killed with SIGKILL halfway, leaving obstore's staging file `files/<id>#<n>`, exactly what a
crashed `backfill serve` leaves. Another child keeps its upload open (in progress, in another
process), and this process has one in progress too.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from polling import poll_async
from test_store import started
from test_store_keys_debris import finished

from backfill.blobs import ObjectBlobs, open_blobs
from backfill.domain.records import Segment
from backfill.scheduler.collector import CLAIM, collect_debris, run_collector
from backfill.scheduler.scheduler import Scheduler
from backfill.settings import Settings
from backfill.store import Store
from backfill.store.memory import MemoryStore

MIB = 1 << 20
GRACE = 3600.0

#: streams 6 MiB into `files/<name>` (so one 5 MiB part is written to its staging file), then
#: holds the upload open until killed
UPLOADER = """
import asyncio, sys
from pathlib import Path
from backfill.blobs import open_blobs

async def main():
    blobs = open_blobs(None, Path(sys.argv[1]))
    async def chunks():
        for _ in range(6):
            yield b"x" * (1 << 20)
        await asyncio.sleep(3600)
    await blobs.put_stream("files/" + sys.argv[2], chunks())

asyncio.run(main())
"""


def start_uploader(data_dir: Path, name: str) -> tuple[subprocess.Popen[bytes], Path]:
    """A child process with an upload in progress; returns it and its staging file."""
    proc = subprocess.Popen([sys.executable, "-c", UPLOADER, str(data_dir), name])
    folder = data_dir / "blobs" / "files"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        staged = [p for p in folder.glob(f"{name}#*") if p.stat().st_size >= 5 * MIB]
        if staged:
            return proc, staged[0]
        assert proc.poll() is None, "the uploader died"
        time.sleep(0.02)
    proc.kill()
    raise TimeoutError(f"no staging file for {name}")


async def blob_paths(blobs: ObjectBlobs, prefix: str) -> list[str]:
    return sorted([info.path async for info in blobs.list_prefix(prefix)])


def test_crash_debris_is_collected_and_work_in_progress_kept(store: Store, tmp_path: Path) -> None:
    blobs = open_blobs(None, tmp_path)
    p = store.ensure_project("p")
    # a batch finalized by a process that died before deleting its segments: rows and blobs
    done = finished(store, p, 1)
    # a terminal batch whose rows are gone but a late segment blob is not
    orphan = finished(store, p, 2)
    assert store.delete_segments(orphan) == 4
    # a running batch: its segments are in use
    running = started(store, p, 3, shards=1)
    shard = store.lease_shard("w", "t", now=100, lease_seconds=30)
    assert shard is not None and shard.batch_id == running.id
    assert store.record_segment(Segment(running.id, 0, 0, f"batches/{running.id}/seg/0", 1, 0), "t")

    crashed, stale = start_uploader(tmp_path, "file-crashed")
    crashed.send_signal(signal.SIGKILL)
    crashed.wait(10)
    two_hours_ago = time.time() - 2 * GRACE
    os.utime(stale, (two_hours_ago, two_hours_ago))  # the crash was two hours ago
    live, in_progress = start_uploader(tmp_path, "file-elsewhere")

    async def scenario() -> None:
        for batch_id in (done, orphan, running.id):
            for n in range(3):
                await blobs.put(f"batches/{batch_id}/seg/0000{n}", b"1 o {}\n")
        release = asyncio.Event()

        async def slow_upload() -> bytes:
            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(6):
                    yield b"y" * MIB
                await release.wait()
                yield b"end"

            await blobs.put_stream("files/file-here", chunks())
            return await blobs.get("files/file-here")

        upload = asyncio.create_task(slow_upload())
        folder = tmp_path / "blobs" / "files"
        await poll_async(
            lambda: [f for f in folder.glob("file-here#*") if f.stat().st_size >= 5 * MIB],
            what="the staging file of the upload in progress",
            timeout=30,
            interval=0.02,
        )

        counts = await collect_debris(store, blobs, time.time(), grace_seconds=GRACE)
        assert (counts.staging_files, counts.staging_bytes) == (1, stale_size)
        assert (counts.batches, counts.rows, counts.orphan_batches) == (1, 4, 1)
        assert not stale.exists()
        assert in_progress.exists(), "another process's upload in progress was collected"
        assert await blob_paths(blobs, "batches") == [
            f"batches/{running.id}/seg/0000{n}" for n in range(3)
        ]
        assert store.shards(done) == [] and store.segments(done) == []
        assert len(store.segments(running.id)) == 1 and len(store.shards(running.id)) == 1

        # this process's own upload is never debris, however long it has been quiet
        later = await collect_debris(store, blobs, time.time() + 10 * GRACE, grace_seconds=GRACE)
        assert later.staging_files == 1  # the other process's, now stale
        assert not in_progress.exists()
        release.set()
        assert await upload == b"y" * 6 * MIB + b"end"
        assert not await collect_debris(store, blobs, time.time(), grace_seconds=GRACE)

    stale_size = stale.stat().st_size
    try:
        asyncio.run(scenario())
    finally:
        live.kill()
        live.wait(10)


def test_one_collection_per_interval_across_processes(tmp_path: Path) -> None:
    store = MemoryStore()
    blobs = open_blobs(None, tmp_path)
    settings = Settings(data_dir=tmp_path, debris_interval_seconds=600)

    async def scenario() -> None:
        now = 1_000_000.0
        assert await run_collector(store, blobs, settings, "scheduler-a", now) is not None
        assert await run_collector(store, blobs, settings, "scheduler-a", now + 1) is None
        assert await run_collector(store, blobs, settings, "scheduler-b", now + 599) is None
        assert await run_collector(store, blobs, settings, "scheduler-b", now + 601) is not None
        assert not store.claim(CLAIM, "someone", now + 700, 1)

    asyncio.run(scenario())


def test_the_scheduler_retention_step_collects(tmp_path: Path) -> None:
    store = MemoryStore()
    blobs = open_blobs(None, tmp_path)
    p = store.ensure_project("p")
    done = finished(store, p, 1)
    settings = Settings(data_dir=tmp_path)
    scheduler = Scheduler(settings, store, blobs, {})

    async def scenario() -> None:
        await blobs.put(f"batches/{done}/seg/00000", b"1 o {}\n")
        await scheduler.tick()
        assert await blob_paths(blobs, "batches") == []
        assert store.segments(done) == []

    asyncio.run(scenario())
