"""The batch flow in one process, with no sockets: memory store, memory blobs, a deterministic
fake engine (a `FunctionEngine` over `Harness.answer`) and a fake clock. Covers what the
scheduler and workers do between them: validation -> shards -> results -> finalize, cancel with
partial results, expiry, the fencing that stops a worker which lost its lease from
committing anything, and runs that fail part-way without stranding a lease or a result.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from polling import poll_async

from backfill.blobs import open_blobs
from backfill.blobs.base import Blobs
from backfill.dispatch.dispatcher import Dispatcher
from backfill.dispatch.policy import Decision
from backfill.domain.records import BatchRecord, FileRecord
from backfill.domain.retry import RetryPolicy
from backfill.domain.statuses import BatchStatus
from backfill.engines.base import EngineReply
from backfill.errors import BlobError, StoreBusy
from backfill.scheduler.scheduler import Scheduler, delete_expired_files
from backfill.settings import Settings
from backfill.store.memory import MemoryStore
from backfill.testing.engine import FunctionEngine, Reply
from backfill.worker import shard_run
from backfill.worker.shard_run import ShardRun
from backfill.worker.worker import Worker

CHAT = "/v1/chat/completions"
SERVED = {"m": frozenset({CHAT})}


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def line(cid: str, content: str) -> bytes:
    body = {"model": "m", "messages": [{"role": "user", "content": content}]}
    return orjson.dumps({"custom_id": cid, "method": "POST", "url": CHAT, "body": body})


class Harness:
    def __init__(self, tmp: Path, store: MemoryStore | None = None, **settings: Any) -> None:
        defaults: dict[str, Any] = {
            "data_dir": tmp,
            "shard_size": 3,
            "flush_every_requests": 2,
            "flush_every_seconds": 0.01,
            "scheduler_interval": 0.01,
            "lease_seconds": 30.0,
            "cancel_grace_seconds": 0.0,
        }
        self.settings = Settings(**{**defaults, **settings})
        self.store = store or MemoryStore()
        self.blobs: Blobs = open_blobs("memory://", tmp)
        self.clock = Clock()
        self.release = asyncio.Event()  # `hold...` requests wait for it
        self.engine = FunctionEngine(self.answer, model="m", endpoints={CHAT})
        self.project = self.store.ensure_project("p")

    async def answer(self, endpoint: str, body: dict[str, Any]) -> Reply:
        """`echo: <content>`; content `fail` gives a 400; `hold...` waits for `release`."""
        text = body["messages"][0]["content"]
        if text.startswith("hold"):
            await self.release.wait()
        if text == "fail":
            return 400, {"error": {"message": "bad", "code": "x"}}
        reply = {
            "object": "chat.completion",
            "choices": [{"message": {"role": "assistant", "content": "echo: " + text}}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5},
        }
        return EngineReply(200, orjson.dumps(reply), request_id="req-" + text)

    def sent(self) -> list[str]:
        """The texts the engine was sent, in order."""
        return [body["messages"][0]["content"] for _, body in self.engine.calls]

    def dispatchers(self, max_concurrency: int = 8) -> dict[str, Dispatcher]:
        policy = RetryPolicy(attempts=1)
        return {"m": Dispatcher(self.engine, max_concurrency=max_concurrency, policy=policy)}

    async def submit(self, contents: list[str]) -> BatchRecord:
        data = b"\n".join(line(f"c{i}", c) for i, c in enumerate(contents)) + b"\n"
        await self.blobs.put("files/f1", data)
        now = int(self.clock())
        self.store.insert_file(
            FileRecord("file-1", self.project.id, "in.jsonl", "batch", len(data), now, "files/f1")
        )
        batch = BatchRecord(
            id="batch_1",
            project_id=self.project.id,
            endpoint=CHAT,
            input_file_id="file-1",
            completion_window="24h",
            status=BatchStatus.VALIDATING,
            created_at=now,
            expires_at=now + 86400,
        )
        return self.store.insert_batch(batch)

    def status(self) -> BatchStatus:
        batch = self.store.get_batch("batch_1")
        assert batch is not None
        return batch.status

    async def lines(self, file_id: str | None) -> list[dict[str, Any]]:
        if file_id is None:
            return []
        file = self.store.get_file(file_id)
        assert file is not None
        data = await self.blobs.get(file.blob_path)
        assert len(data) == file.bytes
        return [orjson.loads(x) for x in data.splitlines()]


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro())  # type: ignore[arg-type]


def test_full_flow_in_input_order(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path)
        await h.submit(["a", "b", "fail", "d", "e", "f", "g"])
        stop = asyncio.Event()
        sched = Scheduler(h.settings, h.store, h.blobs, SERVED, clock=h.clock)
        worker = Worker(h.settings, h.store, h.blobs, h.dispatchers(), clock=h.clock)
        tasks = [asyncio.create_task(sched.run(stop)), asyncio.create_task(worker.run(stop))]
        await poll_async(lambda: h.status() is BatchStatus.COMPLETED, timeout=10, interval=0.005)
        batch = h.store.get_batch("batch_1")
        assert batch is not None
        assert (batch.total, batch.completed, batch.failed) == (7, 6, 1)
        assert batch.usage.input_tokens == 12 and batch.usage.output_tokens == 18
        out = await h.lines(batch.output_file_id)
        assert [x["custom_id"] for x in out] == ["c0", "c1", "c3", "c4", "c5", "c6"]
        assert out[0]["response"]["body"]["choices"][0]["message"]["content"] == "echo: a"
        errors = await h.lines(batch.error_file_id)
        assert [(x["custom_id"], x["response"]["status_code"]) for x in errors] == [("c2", 400)]
        assert len(h.store.shards("batch_1")) == 3
        # segments are cleaned up right after finalization (after the status change)
        path = h.store.segments("batch_1")[0].blob_path

        async def gone() -> bool:
            return not await h.blobs.exists(path)

        await poll_async(gone, timeout=10, interval=0.005)
        stop.set()
        await asyncio.gather(*tasks)

    run(main)


def test_cancel_keeps_finished_results(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path, shard_size=10)
        await h.submit(["a", "b", "hold1", "hold2", "c"])
        stop = asyncio.Event()
        sched = Scheduler(h.settings, h.store, h.blobs, SERVED, clock=h.clock)
        worker = Worker(h.settings, h.store, h.blobs, h.dispatchers(), clock=h.clock)
        tasks = [asyncio.create_task(sched.run(stop)), asyncio.create_task(worker.run(stop))]

        def three_done() -> bool:
            b = h.store.get_batch("batch_1")
            return b is not None and b.completed == 3

        await poll_async(three_done, timeout=10, interval=0.005)
        h.store.transition(
            "batch_1", [BatchStatus.IN_PROGRESS], BatchStatus.CANCELLING, cancelling_at=1
        )
        await poll_async(lambda: h.status() is BatchStatus.CANCELLED, timeout=10, interval=0.005)
        stop.set()
        await asyncio.gather(*tasks)
        batch = h.store.get_batch("batch_1")
        assert batch is not None
        assert (batch.completed, batch.failed) == (3, 2)
        out = await h.lines(batch.output_file_id)
        assert [x["custom_id"] for x in out] == ["c0", "c1", "c4"]
        errors = await h.lines(batch.error_file_id)
        assert [(x["custom_id"], x["error"]["code"]) for x in errors] == [
            ("c2", "batch_cancelled"),
            ("c3", "batch_cancelled"),
        ]
        assert all(x["response"] is None for x in errors)

    run(main)


@pytest.mark.parametrize("may_defer", [False, True])
def test_requests_in_hand_are_twice_the_window_only_when_long_prompts_may_wait(
    tmp_path: Path, may_defer: bool
) -> None:
    """A shard's requests are started up to the model's `max_concurrency` (waiting on its
    window beyond what is in flight), or twice that when a governor may defer long prompts."""

    async def main() -> None:
        h = Harness(tmp_path, shard_size=100)
        await h.submit([f"hold{i}" for i in range(100)])
        dispatchers = h.dispatchers(max_concurrency=20)
        if may_defer:  # as a governor that defers long prompts leaves it (none is long here)
            dispatchers["m"].apply(Decision(limit=20, defer_over=4096.0))
        stop = asyncio.Event()
        sched = Scheduler(h.settings, h.store, h.blobs, SERVED, clock=h.clock)
        worker = Worker(h.settings, h.store, h.blobs, dispatchers, clock=h.clock)
        tasks = [asyncio.create_task(sched.run(stop)), asyncio.create_task(worker.run(stop))]
        dispatcher = dispatchers["m"]
        expected = 20 if may_defer else 0
        await poll_async(
            lambda: dispatcher.in_flight == 20 and dispatcher.waiting == expected,
            timeout=10,
            interval=0.005,
        )
        await asyncio.sleep(0.05)  # and no more are started
        assert dispatcher.waiting == expected
        h.release.set()
        await poll_async(lambda: h.status() is BatchStatus.COMPLETED, timeout=10, interval=0.005)
        stop.set()
        await asyncio.gather(*tasks)

    run(main)


def test_expiry_gives_batch_expired(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path, shard_size=10)
        await h.submit(["a", "hold", "b"])
        stop = asyncio.Event()
        sched = Scheduler(h.settings, h.store, h.blobs, SERVED, clock=h.clock)
        worker = Worker(h.settings, h.store, h.blobs, h.dispatchers(), clock=h.clock)
        tasks = [asyncio.create_task(sched.run(stop)), asyncio.create_task(worker.run(stop))]

        def two_done() -> bool:
            b = h.store.get_batch("batch_1")
            return b is not None and b.completed == 2

        await poll_async(two_done, timeout=10, interval=0.005)
        h.clock.now += 86401  # the window passes
        await poll_async(lambda: h.status() is BatchStatus.EXPIRED, timeout=10, interval=0.005)
        stop.set()
        await asyncio.gather(*tasks)
        batch = h.store.get_batch("batch_1")
        assert batch is not None and batch.expired_at is not None
        errors = await h.lines(batch.error_file_id)
        assert [(x["custom_id"], x["error"]["code"]) for x in errors] == [("c1", "batch_expired")]

    run(main)


def test_worker_that_lost_its_lease_commits_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        # Flush only at the end, so the old worker's first commit comes after its lease is gone.
        h = Harness(
            tmp_path,
            shard_size=10,
            lease_seconds=5.0,
            flush_every_requests=100,
            flush_every_seconds=60.0,
        )
        batch = await h.submit(["hold1", "hold2", "a"])
        sched = Scheduler(h.settings, h.store, h.blobs, SERVED, clock=h.clock)
        await sched.tick()
        await poll_async(lambda: h.status() is BatchStatus.IN_PROGRESS, timeout=10, interval=0.005)
        shard = h.store.lease_shard("w1", "tok1", h.clock(), 5.0)
        running = h.store.get_batch(batch.id)
        assert shard is not None and running is not None
        old = ShardRun(
            settings=h.settings,
            store=h.store,
            blobs=h.blobs,
            dispatchers=h.dispatchers(),
            shard=shard,
            batch=running,
            token="tok1",
            clock=h.clock,
        )
        old_task = asyncio.create_task(old.run())
        await poll_async(lambda: "a" in h.sent(), timeout=10, interval=0.005)
        # The first worker stalls; its lease expires and a second worker takes the shard.
        h.clock.now += 10
        shard2 = h.store.lease_shard("w2", "tok2", h.clock(), 5.0)
        assert shard2 is not None and shard2.index == shard.index
        h.release.set()  # the old worker's held requests now finish
        await asyncio.wait_for(old_task, 10)
        assert h.store.segments(batch.id) == []  # nothing recorded under the lost lease
        new = ShardRun(
            settings=h.settings,
            store=h.store,
            blobs=h.blobs,
            dispatchers=h.dispatchers(),
            shard=shard2,
            batch=running,
            token="tok2",
            clock=h.clock,
        )
        await asyncio.wait_for(new.run(), 10)
        fresh = h.store.get_batch(batch.id)
        assert fresh is not None and (fresh.completed, fresh.failed) == (3, 0)
        assert h.store.shards(batch.id)[0].status == "done"

    run(main)


class _BusyAfterLease(MemoryStore):
    """The memory store, with the first `get_batch` after a shard is leased failing with
    `StoreBusy` (another process holding SQLite's lock at that moment)."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.failed = 0

    def lease_shard(self, *args: Any, **kwargs: Any) -> Any:
        shard = super().lease_shard(*args, **kwargs)
        if shard is not None and not self.failed:
            self.armed = True
        return shard

    def get_batch(self, *args: Any, **kwargs: Any) -> Any:
        if self.armed:
            self.armed = False
            self.failed += 1
            raise StoreBusy("metadata store busy for 5 s (database is locked)")
        return super().get_batch(*args, **kwargs)


def test_a_failed_read_after_leasing_gives_the_shard_back(tmp_path: Path) -> None:
    async def main() -> None:
        # The clock never moves here, so a lease left held would never expire.
        h = Harness(tmp_path, store=_BusyAfterLease(), shard_size=10)
        batch = await h.submit(["a", "b"])
        await Scheduler(h.settings, h.store, h.blobs, SERVED, clock=h.clock).tick()
        await poll_async(lambda: h.status() is BatchStatus.IN_PROGRESS, timeout=10, interval=0.005)
        stop = asyncio.Event()
        worker = Worker(h.settings, h.store, h.blobs, h.dispatchers(), clock=h.clock)
        task = asyncio.create_task(worker.run(stop))
        try:
            await poll_async(
                lambda: [s.status for s in h.store.shards(batch.id)] == ["done"],
                timeout=5,
                interval=0.005,
            )
        finally:
            stop.set()
            await task
        assert isinstance(h.store, _BusyAfterLease) and h.store.failed == 1
        fresh = h.store.get_batch(batch.id)
        assert fresh is not None and (fresh.completed, fresh.failed) == (2, 0)

    run(main)


def test_an_input_read_failing_part_way_records_what_already_ran(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        h = Harness(
            tmp_path,
            shard_size=10,
            plan_prefixes=False,
            flush_every_requests=100,
            flush_every_seconds=60.0,
        )
        batch = await h.submit(["hold1", "hold2", "c", "d"])
        await Scheduler(h.settings, h.store, h.blobs, SERVED, clock=h.clock).tick()
        await poll_async(lambda: h.status() is BatchStatus.IN_PROGRESS, timeout=10, interval=0.005)
        # The input is read two lines at a time, and its second read fails.
        monkeypatch.setattr(shard_run, "INPUT_CHUNK", 2 * (len(line("c0", "hold1")) + 1))
        read = h.blobs.get_range
        reads = 0

        async def get_range(path: str, start: int, end: int) -> bytes:
            nonlocal reads
            if path == "files/f1":
                reads += 1
                if reads == 2:
                    raise BlobError("blob store unavailable")
            return await read(path, start, end)

        monkeypatch.setattr(h.blobs, "get_range", get_range)
        shard = h.store.lease_shard("w1", "tok1", h.clock(), 30.0)
        running = h.store.get_batch(batch.id)
        assert shard is not None and running is not None
        run_ = ShardRun(
            settings=h.settings,
            store=h.store,
            blobs=h.blobs,
            dispatchers=h.dispatchers(),
            shard=shard,
            batch=running,
            token="tok1",
            clock=h.clock,
        )
        task = asyncio.create_task(run_.run())
        await poll_async(lambda: reads == 2 and h.sent() == ["hold1", "hold2"], timeout=10)
        h.release.set()  # the two requests in flight when the read failed now finish
        with pytest.raises(BlobError):
            await asyncio.wait_for(task, 10)
        # Their results are recorded before the error ends the run; the lines never read are
        # not, and the shard is not finished: they run on the next lease.
        fresh = h.store.get_batch(batch.id)
        assert fresh is not None and (fresh.completed, fresh.failed) == (2, 0)
        assert h.store.shards(batch.id)[0].status != "done"
        assert h.sent() == ["hold1", "hold2"]

    run(main)


def test_retention_deletes_expired_files_but_not_inputs_in_use(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path)
        await h.submit(["a"])  # file-1 is the input of a validating batch
        await h.blobs.put("files/f2", b"x")
        h.store.insert_file(
            FileRecord("file-2", h.project.id, "x", "batch", 1, 1, "files/f2", expires_at=5)
        )
        old = h.store.get_file("file-1")
        assert old is not None
        h.store.delete_file("file-1")
        h.store.insert_file(
            FileRecord(
                old.id,
                old.project_id,
                old.filename,
                old.purpose,
                old.bytes,
                old.created_at,
                old.blob_path,
                expires_at=5,
            )
        )
        assert await delete_expired_files(h.store, h.blobs, now=10) == 1
        assert h.store.get_file("file-2") is None
        assert not await h.blobs.exists("files/f2")
        assert h.store.get_file("file-1") is not None

    run(main)
