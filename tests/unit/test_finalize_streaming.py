"""The merge of a shard's segments streams: finalization and partial output hold a few MB,
never a whole segment nor even one whole large answer, and emit lines in input order with the
first record of a line winning. A completed batch whose segments lack a line raises
`ResultsMissing` instead of inventing an outcome; a cancelled one still gets `batch_cancelled`
lines, streamed from the input.

Batches are built directly through the store and blob APIs (no worker), so each test decides
exactly which records sit in which segment.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from test_api_support import api_harness

from backfill.blobs import open_blobs
from backfill.blobs.base import Blobs
from backfill.domain.finalize import result_file_id
from backfill.domain.records import BatchRecord, FileRecord, Segment, Shard
from backfill.domain.results import ERROR, OUTPUT, segment_record
from backfill.domain.segments import CHUNK, READ_CAP
from backfill.domain.statuses import BatchStatus
from backfill.errors import ResultsMissing
from backfill.scheduler.finalizer import finalize
from backfill.store.base import Store
from backfill.store.memory import MemoryStore

CHAT = "/v1/chat/completions"
NOW = 1_800_000_000
Record = tuple[int, bytes, bytes]  # line_no, kind, json line


class ReadRecorder:
    """A `Blobs` that remembers the largest piece any read handed back, and whole-object
    `get`s."""

    def __init__(self, inner: Blobs) -> None:
        self.inner = inner
        self.largest = 0
        self.gets: list[str] = []

    def _saw(self, n: int) -> None:
        self.largest = max(self.largest, n)

    async def put(self, path: str, data: bytes) -> None:
        await self.inner.put(path, data)

    async def put_stream(self, path: str, chunks: AsyncIterable[bytes]) -> int:
        return await self.inner.put_stream(path, chunks)

    async def get(self, path: str) -> bytes:
        data = await self.inner.get(path)
        self.gets.append(path)
        self._saw(len(data))
        return data

    async def stream(
        self, path: str, start: int = 0, end: int | None = None, chunk_size: int = 1 << 20
    ) -> AsyncIterator[bytes]:
        async for chunk in self.inner.stream(path, start, end, chunk_size):
            self._saw(len(chunk))
            yield chunk

    async def get_range(self, path: str, start: int, end: int) -> bytes:
        data = await self.inner.get_range(path, start, end)
        self._saw(len(data))
        return data

    async def size(self, path: str) -> int:
        return await self.inner.size(path)

    async def exists(self, path: str) -> bool:
        return await self.inner.exists(path)

    async def delete(self, path: str) -> None:
        await self.inner.delete(path)

    async def delete_prefix(self, prefix: str) -> None:
        await self.inner.delete_prefix(prefix)

    def list_prefix(self, prefix: str) -> AsyncIterator[Any]:
        return self.inner.list_prefix(prefix)

    def list_staging(self) -> AsyncIterator[Any]:
        return self.inner.list_staging()

    async def delete_staging(self, path: str) -> None:
        await self.inner.delete_staging(path)


def request(cid: str) -> bytes:
    body = {"model": "m", "messages": [{"role": "user", "content": cid}]}
    return orjson.dumps({"custom_id": cid, "method": "POST", "url": CHAT, "body": body})


def answer(cid: str, pad: int = 0) -> bytes:
    body = {"choices": [{"message": {"content": "x" * pad}}]}
    response = {"status_code": 200, "request_id": "req_" + cid, "body": body}
    return orjson.dumps({"id": "batch_req_" + cid, "custom_id": cid, "response": response})


def failure(cid: str) -> bytes:
    error = {"code": "bad", "message": "no"}
    return orjson.dumps({"id": "batch_req_" + cid, "custom_id": cid, "error": error})


async def build(
    store: Store,
    blobs: Blobs,
    project_id: str,
    shards: Sequence[Sequence[bytes]],
    segments: dict[int, list[list[Record]]],
    batch_id: str = "batch_s",
) -> BatchRecord:
    """A running batch whose input has one group of lines per shard (b"" is a blank line) and
    whose shard `i` recorded `segments[i]`, one list of records per segment."""
    data = b"".join(line + b"\n" for group in shards for line in group)
    await blobs.put("files/in", data)
    store.insert_file(
        FileRecord("file-in", project_id, "in.jsonl", "batch", len(data), NOW, "files/in")
    )
    store.insert_batch(
        BatchRecord(
            id=batch_id,
            project_id=project_id,
            endpoint=CHAT,
            input_file_id="file-in",
            completion_window="24h",
            status=BatchStatus.VALIDATING,
            created_at=NOW,
            expires_at=NOW + 86400,
        )
    )
    plan, start, line_no = [], 0, 1
    for index, group in enumerate(shards):
        end = start + sum(len(line) + 1 for line in group)
        plan.append(Shard(batch_id, index, line_no, start, end, sum(1 for x in group if x)))
        start, line_no = end, line_no + len(group)
    total = sum(s.count for s in plan)
    assert store.start_batch(batch_id, plan, model="m", total=total, now=NOW) is not None
    for n in range(len(plan)):
        shard = store.lease_shard("w", f"tok{n}", now=NOW, lease_seconds=1e6)
        assert shard is not None
        for seq, records in enumerate(segments.get(shard.index, [])):
            path = f"batches/{batch_id}/seg/{shard.index:05d}-{seq:06d}"
            await blobs.put(path, b"".join(segment_record(*r) for r in records))
            ok = sum(1 for r in records if r[1] == OUTPUT)
            seg = Segment(batch_id, shard.index, seq, path, ok, len(records) - ok)
            assert store.record_segment(seg, f"tok{n}")
        assert store.finish_shard(batch_id, shard.index, f"tok{n}")
    batch = store.get_batch(batch_id)
    assert batch is not None
    return batch


async def finish(
    store: Store, blobs: Blobs, batch: BatchRecord, final: BatchStatus = BatchStatus.COMPLETED
) -> BatchRecord | None:
    step = BatchStatus.FINALIZING if final is BatchStatus.COMPLETED else BatchStatus.CANCELLING
    moved = store.transition(batch.id, [BatchStatus.IN_PROGRESS], step)
    assert moved is not None
    return await finalize(store, blobs, moved, final, frozenset({step}), NOW + 10)


async def file_lines(store: Store, blobs: Blobs, file_id: str | None) -> list[bytes]:
    assert file_id is not None
    file = store.get_file(file_id)
    assert file is not None
    data = await blobs.get(file.blob_path)
    assert len(data) == file.bytes
    return data.splitlines()


@pytest.fixture(params=["memory", "local"])
def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> Blobs:
    url = "memory://" if request.param == "memory" else str(tmp_path / "blobs")
    return open_blobs(url, tmp_path)


def test_large_answers_are_never_read_whole(blobs: Blobs) -> None:
    """Five answers of 5 MB in two segments, recorded out of order: the output is in input
    order and no read (whole segment, range or stream piece) is anywhere near one answer."""
    big = READ_CAP + (1 << 20)
    ids = [f"c{i}" for i in range(6)]
    answers = {i + 1: answer(cid, big) for i, cid in enumerate(ids)}
    answers[4] = answer("c3", 10)  # a small one between big ones
    segs = [
        [(3, OUTPUT, answers[3]), (1, OUTPUT, answers[1]), (2, OUTPUT, answers[2])],
        [(6, OUTPUT, answers[6]), (4, OUTPUT, answers[4]), (5, OUTPUT, answers[5])],
    ]

    async def body() -> None:
        store = MemoryStore()
        project = store.ensure_project("p")
        recorder = ReadRecorder(blobs)
        batch = await build(store, blobs, project.id, [[request(c) for c in ids]], {0: segs})
        done = await finish(store, recorder, batch)
        assert done is not None and done.status is BatchStatus.COMPLETED
        assert done.error_file_id is None
        assert await file_lines(store, blobs, done.output_file_id) == [
            answers[n] for n in range(1, 7)
        ]
        largest_line = max(len(a) for a in answers.values())
        assert recorder.gets == []
        assert recorder.largest < 2 * largest_line
        assert recorder.largest <= 2 * CHUNK  # in fact: streamed, not even one line at once

    asyncio.run(body())


def test_small_answers_merge_first_record_wins_with_both_kinds(blobs: Blobs) -> None:
    """Many small lines shuffled over segments, some recorded twice (the first wins, even when
    the duplicate is of the other kind), across two shards with a blank input line."""
    n = 300
    lines: list[bytes] = [request(f"c{i}") for i in range(1, n + 1)]
    lines.insert(150, b"")  # blank line 151: counted, not a request
    first_line_no = {i: i if i <= 150 else i + 1 for i in range(1, n + 1)}
    outcome = {
        first_line_no[i]: ((ERROR, failure(f"c{i}")) if i % 7 == 0 else (OUTPUT, answer(f"c{i}")))
        for i in range(1, n + 1)
    }

    def records(nos: list[int]) -> list[Record]:
        return [(no, *outcome[no]) for no in nos]

    shard0 = list(range(1, 151))
    shard1 = list(range(152, n + 2))
    # completion order shuffled within windows of 8; segments of 40
    shuffled0 = [no for w in range(0, 150, 8) for no in reversed(shard0[w : w + 8])]
    segs0 = [records(shuffled0[i : i + 40]) for i in range(0, 150, 40)]
    segs0.append([(5, ERROR, b'{"dup":1}'), (14, OUTPUT, b'{"dup":2}')])
    segs1 = [records(shard1[::2]), [*records(shard1[1::2]), (152, OUTPUT, b'{"dup":3}')]]

    async def body() -> None:
        store = MemoryStore()
        project = store.ensure_project("p")
        groups = [lines[:150], lines[150:]]
        batch = await build(store, blobs, project.id, groups, {0: segs0, 1: segs1})
        done = await finish(store, blobs, batch)
        assert done is not None and done.status is BatchStatus.COMPLETED
        want_out = [line for no, (k, line) in sorted(outcome.items()) if k == OUTPUT]
        want_err = [line for no, (k, line) in sorted(outcome.items()) if k == ERROR]
        assert await file_lines(store, blobs, done.output_file_id) == want_out
        assert await file_lines(store, blobs, done.error_file_id) == want_err

    asyncio.run(body())


def test_completed_with_a_missing_line_raises_and_invents_nothing(blobs: Blobs) -> None:
    lines = [request(f"c{i}") for i in range(1, 7)]
    segments = {
        0: [[(1, OUTPUT, answer("c1")), (2, OUTPUT, answer("c2")), (3, OUTPUT, answer("c3"))]],
        1: [[(4, OUTPUT, answer("c4")), (6, ERROR, failure("c6"))]],  # line 5: no outcome
        2: [[(7, ERROR, failure("c7"))]],  # lines 8 and 9: none either
    }
    lines += [request("c7"), request("c8"), request("c9")]

    async def body() -> None:
        store = MemoryStore()
        project = store.ensure_project("p")
        groups = [lines[:3], lines[3:6], lines[6:]]
        batch = await build(store, blobs, project.id, groups, segments)
        with pytest.raises(ResultsMissing) as caught:
            await finish(store, blobs, batch)
        assert caught.value.batch_id == batch.id
        assert caught.value.shards == [1, 2]
        after = store.get_batch(batch.id)
        assert after is not None and after.status is BatchStatus.FINALIZING
        assert after.output_file_id is None and after.error_file_id is None
        for kind in ("output", "error"):
            file_id = result_file_id(batch.id, kind)
            assert store.get_file(file_id) is None
            assert not await blobs.exists(f"files/{file_id}")  # no batch_expired anywhere
        assert await blobs.exists(f"batches/{batch.id}/seg/00001-000000")  # kept for the re-run

    asyncio.run(body())


def test_cancelled_batch_gets_cancelled_lines_in_input_order_from_a_streamed_input(
    blobs: Blobs,
) -> None:
    """Requests that never ran get `batch_cancelled` at their place among the recorded errors;
    the input is read in pieces, not as one range of the shard (its requests are large)."""
    pad = "y" * (3 << 20)
    lines = [
        orjson.dumps({"custom_id": f"c{i}", "method": "POST", "url": CHAT, "body": {"p": pad}})
        for i in range(1, 8)
    ]
    small = [request("c8"), request("c9")]
    groups = [lines[:4], [lines[4], b"", lines[5], lines[6]], small]  # line 6 is blank
    segments = {
        0: [[(3, ERROR, failure("c3")), (1, OUTPUT, answer("c1"))]],
        2: [[(10, ERROR, failure("c9")), (9, OUTPUT, answer("c8"))]],  # ran in full
    }

    async def body() -> None:
        store = MemoryStore()
        project = store.ensure_project("p")
        recorder = ReadRecorder(blobs)
        batch = await build(store, blobs, project.id, groups, segments)
        done = await finish(store, recorder, batch, BatchStatus.CANCELLED)
        assert done is not None and done.status is BatchStatus.CANCELLED
        assert (done.completed, done.failed) == (2, 7)
        assert await file_lines(store, blobs, done.output_file_id) == [
            answer("c1"),
            answer("c8"),
        ]
        errors = [orjson.loads(x) for x in await file_lines(store, blobs, done.error_file_id)]
        assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [
            ("c2", "batch_cancelled"),
            ("c3", "bad"),
            ("c4", "batch_cancelled"),
            ("c5", "batch_cancelled"),
            ("c6", "batch_cancelled"),
            ("c7", "batch_cancelled"),
            ("c9", "bad"),
        ]
        assert recorder.gets == []
        assert recorder.largest < 2 * max(len(x) for x in lines)
        assert recorder.largest <= 2 * CHUNK

    asyncio.run(body())


def test_partial_output_streams_in_input_order_first_record_wins(tmp_path: Path) -> None:
    """While the batch runs: each shard's lines in input order, a line recorded twice (in
    another segment, even as the other kind) appears once as first recorded, and no read is
    near a whole segment of large answers."""
    big = 3 << 20
    a = {n: answer(f"c{n}", big if n in (2, 4) else 0) for n in range(1, 7)}
    segments = {
        0: [
            [(2, OUTPUT, a[2]), (1, OUTPUT, a[1]), (3, ERROR, failure("c3"))],
            [(2, OUTPUT, answer("c2", 5)), (4, OUTPUT, a[4]), (1, ERROR, failure("c1"))],
        ],
        1: [[(6, OUTPUT, a[6]), (5, ERROR, failure("c5"))], [(5, OUTPUT, a[5])]],
    }
    lines = [request(f"c{n}") for n in range(1, 7)]

    async def body() -> None:
        async with api_harness(tmp_path) as api:
            recorder = ReadRecorder(api.blobs)
            batch = await build(
                api.store, api.blobs, api.project.id, [lines[:4], lines[4:]], segments
            )
            api.ctx.blobs = recorder
            url = f"/v1/batches/{batch.id}/output"
            r = await api.client.get(url, headers=api.headers)
            assert r.status_code == 200 and r.headers["x-backfill-complete"] == "false"
            assert r.content.splitlines() == [a[1], a[2], a[4], a[6]]
            r = await api.client.get(url + "?kind=error", headers=api.headers)
            assert r.content.splitlines() == [failure("c3"), failure("c5")]
            assert recorder.gets == []
            assert recorder.largest < 2 * max(len(x) for x in a.values())

    asyncio.run(body())
