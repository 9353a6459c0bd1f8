"""The streaming reader of the segment format: records and their places out of arbitrary
chunkings, and the grouping of a shard's lines into bounded reads."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from backfill.domain.results import ERROR, OUTPUT, segment_record
from backfill.domain.segments import (
    CHUNK,
    HOLD,
    READ_CAP,
    LineSplitter,
    RecordIndexer,
    RecordPlace,
    index_records,
    index_shard,
    iter_lines,
    iter_records,
    parse_record,
    plan_reads,
    shard_lines,
)


def chunked(data: bytes, sizes: list[int]) -> list[bytes]:
    out, at, i = [], 0, 0
    while at < len(data):
        size = sizes[i % len(sizes)]
        out.append(data[at : at + size])
        at += size
        i += 1
    return out


async def _aiter(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def _collect_records(chunks: list[bytes]) -> list[tuple[int, bytes, bytes]]:
    async def go() -> list[tuple[int, bytes, bytes]]:
        return [r async for r in iter_records(_aiter(chunks))]

    return asyncio.run(go())


SEGMENT = (
    segment_record(12, OUTPUT, b'{"a": "x y z"}')
    + b"\n"  # an empty record is skipped
    + segment_record(3, ERROR, b'{"b":2}')
    + segment_record(1000000, OUTPUT, b"{" + b'"p":"' + b"q" * 5000 + b'"}')
)


@pytest.mark.parametrize("sizes", [[1], [2, 3], [7], [64], [4096], [1 << 20], [5, 1, 9000]])
def test_records_and_places_from_any_chunking(sizes: list[int]) -> None:
    chunks = chunked(SEGMENT, sizes)
    want = [parse_record(r) for r in SEGMENT.split(b"\n") if r]
    assert _collect_records(chunks) == want
    indexer = RecordIndexer(segment=3)
    places = [p for c in chunks for p in indexer.feed(c)] + indexer.finish()
    assert [(p.line_no, p.kind) for p in places] == [(no, kind) for no, kind, _ in want]
    for place, (_, _, line) in zip(places, want, strict=True):
        assert place.segment == 3
        assert SEGMENT[place.offset : place.offset + place.length] == line


def test_last_record_without_newline_and_malformed_ones() -> None:
    data = segment_record(1, OUTPUT, b"{}") + b"2 e {}"
    indexer = RecordIndexer()
    assert indexer.feed(data) == [RecordPlace(1, OUTPUT, 0, 4, 2)]
    assert indexer.finish() == [RecordPlace(2, ERROR, 0, len(data) - 2, 2)]
    assert _collect_records([data]) == [(1, OUTPUT, b"{}"), (2, ERROR, b"{}")]
    for bad in (b"12 x {}\n", b"12\n", b"1" * 100 + b" o {}\n"):
        with pytest.raises(ValueError):
            RecordIndexer().feed(bad)
    truncated = RecordIndexer()
    truncated.feed(b"12 o")
    with pytest.raises(ValueError):
        truncated.finish()


def test_index_records_async() -> None:
    async def go() -> list[RecordPlace]:
        return [p async for p in index_records(_aiter(chunked(SEGMENT, [3])), segment=2)]

    assert [(p.line_no, p.segment) for p in asyncio.run(go())] == [(12, 2), (3, 2), (1000000, 2)]


def test_lines_keep_blank_ones() -> None:
    data = b"a\n\nbb\nccc"
    splitter = LineSplitter()
    got = [line for c in chunked(data, [2]) for line in splitter.feed(c)]
    assert [*got, splitter.finish()] == [b"a", b"", b"bb", b"ccc"]

    async def go() -> list[bytes]:
        return [line async for line in iter_lines(_aiter(chunked(b"x\ny\n", [1])))]

    assert asyncio.run(go()) == [b"x", b"y"]


class FakeSource:
    """Segments in memory, streamed in awkward 7-byte pieces."""

    def __init__(self, segments: dict[str, bytes]) -> None:
        self.segments = segments
        self.ranges: list[tuple[str, int, int]] = []

    async def stream(
        self, path: str, start: int = 0, end: int | None = None, chunk_size: int = 1 << 20
    ) -> AsyncIterator[bytes]:
        data = self.segments[path][start:end]
        for at in range(0, len(data), 7):
            yield data[at : at + 7]

    async def get_range(self, path: str, start: int, end: int) -> bytes:
        self.ranges.append((path, start, end))
        return self.segments[path][start:end]


@pytest.mark.parametrize("hold", [0, 1 << 20])
def test_shard_merge_first_record_wins_in_input_order_with_extra_lines(hold: int) -> None:
    seg_a = b"".join(
        segment_record(n, k, line)
        for n, k, line in [
            (4, OUTPUT, b'{"n":4}'),
            (2, ERROR, b'{"n":2,"e":1}'),
            (1, OUTPUT, b'{"n":1}'),
        ]
    )
    seg_b = b"".join(
        segment_record(n, k, line)
        for n, k, line in [
            (2, OUTPUT, b'{"dup":2}'),  # the error recorded first wins
            (7, OUTPUT, b'{"n":7}'),
            (4, OUTPUT, b'{"dup":4}'),
        ]
    )
    source = FakeSource({"a": seg_a, "b": seg_b})

    async def extra() -> AsyncIterator[tuple[int, bytes]]:
        for n in (3, 5, 9):
            yield n, b'{"never":%d}' % n

    async def go() -> tuple[bytes, bytes]:
        index = await index_shard(source, ["a", "b"], hold=hold)
        places = index.places
        assert sorted(places) == [1, 2, 4, 7]
        assert places[2] == RecordPlace(2, ERROR, 0, places[2].offset, 13)
        assert sorted(index.held) == ([0, 1] if hold else [])
        out = b"".join([c async for c in shard_lines(source, ["a", "b"], index, OUTPUT)])
        err = b"".join([c async for c in shard_lines(source, ["a", "b"], index, ERROR, extra())])
        assert bool(source.ranges) == (hold == 0)  # held segments are not read again
        return out, err

    out, err = asyncio.run(go())
    assert out == b'{"n":1}\n{"n":4}\n{"n":7}\n'
    assert err == b'{"n":2,"e":1}\n{"never":3}\n{"never":5}\n{"never":9}\n'


def _contiguous(n: int, size: int, per_segment: int) -> list[RecordPlace]:
    """`n` lines of `size` bytes, in order, `per_segment` to a segment, headers between."""
    places = []
    for i in range(n):
        segment, k = divmod(i, per_segment)
        places.append(RecordPlace(i + 1, OUTPUT, segment, k * (size + 12) + 10, size))
    return places


def test_small_lines_are_read_in_few_large_reads() -> None:
    places = _contiguous(50_000, 300, 1000)
    groups = list(plan_reads(places, cap=4 << 20))
    reads = [r for g in groups for r in g.reads]
    assert [p for g in groups for p in g.places] == places
    assert len(reads) <= 50 + len(groups)  # one per segment touched, per group
    assert all(sum(p.length for p in g.places) <= 4 << 20 for g in groups)
    assert all(r.end - r.start <= 2 * (4 << 20) for r in reads)


def test_shuffled_completion_order_still_coalesces() -> None:
    rng = random.Random(7)
    order = list(range(20_000))
    for w in range(0, len(order), 32):  # shuffled within a concurrency window
        window = order[w : w + 32]
        rng.shuffle(window)
        order[w : w + 32] = window
    place_of = {}
    for pos, i in enumerate(order):  # written in completion order, 500 to a segment
        segment, k = divmod(pos, 500)
        place_of[i] = RecordPlace(i + 1, OUTPUT, segment, k * 312 + 10, 300)
    places = [place_of[i] for i in range(20_000)]
    groups = list(plan_reads(places, cap=1 << 20))
    reads = [r for g in groups for r in g.reads]
    assert len(reads) < 3 * len(groups) + 40


def test_long_lines_are_streamed_alone() -> None:
    places = [
        RecordPlace(1, OUTPUT, 0, 10, 100),
        RecordPlace(2, OUTPUT, 0, 122, 5 << 20),
        RecordPlace(3, OUTPUT, 0, (5 << 20) + 134, 100),
    ]
    groups = list(plan_reads(places, cap=4 << 20))
    assert [(len(g.places), g.streamed) for g in groups] == [(1, False), (1, True), (1, False)]


@pytest.mark.parametrize("hold", [0, HOLD])
def test_a_long_line_is_copied_in_pieces(hold: int) -> None:
    long = b'{"p":"' + b"z" * (READ_CAP + 100) + b'"}'
    seg = segment_record(2, OUTPUT, b'{"n":2}') + segment_record(1, OUTPUT, long)
    source = FakeSource({"a": seg})

    async def go() -> list[bytes]:
        index = await index_shard(source, ["a"], hold=hold)
        return [c async for c in shard_lines(source, ["a"], index, OUTPUT)]

    pieces = asyncio.run(go())
    assert b"".join(pieces) == long + b'\n{"n":2}\n'
    assert max(len(p) for p in pieces) <= CHUNK
