"""How many shards a worker runs: as many as the models can take, beyond `worker_shards`.

The arithmetic of `worker/capacity.py`, then the real `Worker` on a memory store with a
`FunctionEngine` that holds every request until the test releases it, so what is in flight at
once can be counted without timing anything: many one-request batches all reach the engine
together; a model whose window one large shard fills gets no more shards than the floor; and
when one model is full, the shards of another are leased past the full model's batches.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from polling import poll_async

from backfill.blobs import open_blobs
from backfill.dispatch.dispatcher import Dispatcher
from backfill.domain.records import BatchRecord, FileRecord, Shard, ShardStatus
from backfill.domain.retry import RetryPolicy
from backfill.domain.statuses import BatchStatus
from backfill.settings import Settings
from backfill.store.memory import MemoryStore
from backfill.testing.engine import FunctionEngine, Reply
from backfill.worker.capacity import STARTING_SECONDS, RunningShard, full_models, room
from backfill.worker.worker import Worker

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
NOW = 1_800_000_000


# -- the arithmetic ---------------------------------------------------------------------------
def test_room_counts_starting_shards_until_they_show_in_the_dispatcher() -> None:
    fresh = [RunningShard("m", 1, leased_at=100.0) for _ in range(3)]
    # just leased: nothing held yet, three requests to come
    assert room(limit=8, held=0, shards=fresh, now=100.5) == 5
    # a while later their requests are held by the dispatcher, not counted twice
    assert room(limit=8, held=3, shards=fresh, now=100.0 + STARTING_SECONDS) == 5
    # both at once (started and still fresh) never counts more than the shards' demand
    assert room(limit=8, held=3, shards=fresh, now=100.5) == 5


def test_room_of_a_large_shard_follows_what_is_held() -> None:
    big = [RunningShard("m", 256, leased_at=0.0)]
    assert room(limit=64, held=0, shards=big, now=1.0) <= 0  # starting: fills the window
    assert room(limit=64, held=64, shards=big, now=10.0) <= 0  # running: fills it
    assert room(limit=64, held=10, shards=big, now=10.0) == 54  # draining its last requests


def test_full_models() -> None:
    shards = [RunningShard("a", 8, 0.0), RunningShard("b", 1, 0.0), RunningShard(None, 0, 0.0)]
    full, some_room = full_models({"a": (8, 8), "b": (8, 1)}, shards, now=10.0)
    assert full == {"a"} and some_room
    full, some_room = full_models({"a": (8, 8)}, shards, now=10.0)
    assert full == {"a"} and not some_room


# -- the worker -------------------------------------------------------------------------------
class Held:
    """An engine that holds every request until `release` is set and counts them."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.in_flight: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()

    async def answer(self, endpoint: str, body: dict[str, Any]) -> Reply:
        model = body["model"]
        self.in_flight[model] += 1
        self.peak[model] = max(self.peak[model], self.in_flight[model])
        try:
            await self.release.wait()
        finally:
            self.in_flight[model] -= 1
        choice = {"message": {"role": "assistant", "content": "ok"}}
        return 200, {"object": "chat.completion", "choices": [choice]}


class Setup:
    def __init__(self, tmp: Path, limits: dict[str, int], **settings: Any) -> None:
        defaults: dict[str, Any] = {
            "data_dir": tmp,
            "flush_every_seconds": 0.01,
            "scheduler_interval": 0.01,
            "cancel_grace_seconds": 0.0,
        }
        self.settings = Settings(**{**defaults, **settings})
        self.store = MemoryStore()
        self.blobs = open_blobs("memory://", tmp)
        self.project = self.store.ensure_project("p")
        self.held = Held()
        self.dispatchers = {
            model: Dispatcher(
                FunctionEngine(self.held.answer, model=model, endpoints={CHAT}),
                max_concurrency=limit,
                policy=RetryPolicy(attempts=1),
            )
            for model, limit in limits.items()
        }
        self.worker = Worker(self.settings, self.store, self.blobs, self.dispatchers)
        self.batches: list[str] = []

    async def batch(
        self, model: str, shards: int = 1, per_shard: int = 1, deadline: int = 0
    ) -> str:
        """A batch already planned (in_progress), `shards` shards of `per_shard` requests."""
        n = len(self.batches)
        batch_id = f"batch_{n}"
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        lines = [
            orjson.dumps({"custom_id": f"c{i}", "method": "POST", "url": CHAT, "body": body})
            + b"\n"
            for i in range(shards * per_shard)
        ]
        data = b"".join(lines)
        await self.blobs.put(f"files/f{n}", data)
        self.store.insert_file(
            FileRecord(
                f"file-{n}", self.project.id, "in.jsonl", "batch", len(data), NOW, f"files/f{n}"
            )
        )
        record = BatchRecord(
            id=batch_id,
            project_id=self.project.id,
            endpoint=CHAT,
            input_file_id=f"file-{n}",
            completion_window="24h",
            status=BatchStatus.VALIDATING,
            created_at=NOW,
            expires_at=NOW + 86400 + deadline,
        )
        self.store.insert_batch(record)
        plan = []
        offset = 0
        for i in range(shards):
            size = sum(len(x) for x in lines[i * per_shard : (i + 1) * per_shard])
            plan.append(Shard(batch_id, i, 1 + i * per_shard, offset, offset + size, per_shard))
            offset += size
        started = self.store.start_batch(
            batch_id, plan, model=model, total=shards * per_shard, now=NOW
        )
        assert started is not None
        self.batches.append(batch_id)
        return batch_id

    def all_done(self) -> bool:
        return all(s.status is ShardStatus.DONE for b in self.batches for s in self.store.shards(b))


async def test_many_one_request_batches_run_at_once(tmp_path: Path) -> None:
    setup = Setup(tmp_path, {"m": 64})
    for _ in range(12):
        await setup.batch("m")
    stop = asyncio.Event()
    task = asyncio.create_task(setup.worker.run(stop))
    try:
        # with a fixed 4 shards at a time, only 4 requests ever reach the engine together
        await poll_async(
            lambda: setup.held.in_flight["m"],
            lambda n: n == 12,
            what="12 one-request batches at the engine at once",
            timeout=15,
        )
        setup.held.release.set()
        await poll_async(setup.all_done, what="every shard done", timeout=30)
    finally:
        stop.set()
        await task
    assert setup.held.peak["m"] == 12
    assert setup.worker.peak_shards == 12


async def test_a_model_filled_by_large_shards_gets_only_the_floor(tmp_path: Path) -> None:
    setup = Setup(tmp_path, {"m": 4}, worker_shards=4)
    await setup.batch("m", shards=8, per_shard=20)
    stop = asyncio.Event()
    task = asyncio.create_task(setup.worker.run(stop))
    dispatcher = setup.dispatchers["m"]
    try:
        # four shards keep in_hand() = 16 requests started each: 4 at the engine, 60 waiting
        await poll_async(lambda: dispatcher.waiting, lambda n: n == 60, timeout=15)
        for _ in range(30):  # the worker's poll interval is 10 ms: give it many chances
            await asyncio.sleep(0.01)
        assert len(setup.worker._runs) == 4
        setup.held.release.set()
        await poll_async(setup.all_done, what="every shard done", timeout=30)
    finally:
        stop.set()
        await task
    assert setup.held.peak["m"] == 4


async def test_a_full_model_does_not_keep_another_waiting(tmp_path: Path) -> None:
    # "big": one batch, first in the order (earliest deadline), its shards fill its window of
    # 2; "small": eight one-request batches. Past the floor of 4 big shards, the worker must
    # lease the small batches, not more big shards (at most 12 shards in all).
    setup = Setup(tmp_path, {"big": 2, "small": 64}, worker_shards=4, worker_max_shards=12)
    await setup.batch("big", shards=16, per_shard=20, deadline=-3600)
    for _ in range(8):
        await setup.batch("small")
    stop = asyncio.Event()
    task = asyncio.create_task(setup.worker.run(stop))
    try:
        await poll_async(
            lambda: setup.held.in_flight["small"],
            lambda n: n == 8,
            what="the small batches at the engine beside the full model",
            timeout=15,
        )
        assert setup.held.in_flight["big"] == 2
        setup.held.release.set()
        await poll_async(setup.all_done, what="every shard done", timeout=60)
    finally:
        stop.set()
        await task
