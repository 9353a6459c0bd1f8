"""Reading result segments as streams, and merging a shard's segments without holding them.

A segment (`backfill.domain.results`) is a run of records `<line_no> <o|e> <json line>\\n`, and
one answer can be tens of megabytes, so the merge holds a few MB of segment bytes at a time
(`HOLD`, `READ_CAP`), never a large segment nor a line of `READ_CAP` or more:

- `LineSplitter` / `iter_lines` / `iter_records`: complete lines (records) out of a chunked
  byte stream; memory is one line plus one chunk.
- `RecordIndexer` / `index_records`: only where each record is (line number, kind, offset and
  length of its json line within the segment), never the line itself: a 50 MB answer costs a
  few ints, and a shard's merge is planned in O(lines in the shard) small ints.
- `plan_reads`: the lines of one kind in input order, grouped into bounded reads. Workers
  record answers roughly in input order (shuffled within their concurrency window, one
  segment per flush), so a few MB of consecutive lines sit close together in a few segments:
  each group is read with about one ranged read per segment it touches (the small gaps
  between wanted lines read and dropped). A line of `READ_CAP` or more is streamed on its own
  in `CHUNK`-sized pieces instead, so memory does not grow even with the largest line
  (`bench/finalize_memory.py`: 25 MiB for 20 lines of 50 MB, where loading segments took
  3.2 GiB).
- `index_shard` / `shard_lines`: the async driver, through `SegmentSource`, two methods that
  `backfill.blobs.base.Blobs` has: the domain stays free of the blob backends, and the API's
  partial output and the scheduler's finalization share one merge. The first record of a
  line wins, so a request recorded twice still appears once. The index pass keeps the
  segments it read whole up to `HOLD` bytes a shard (`ShardIndex.held`), and the copy slices
  those: small lines cost one read per segment, as loading the segments did (50,000 lines:
  as fast as before), and the ranged reads are left for the segments of large answers.
"""

from __future__ import annotations

import bisect
import operator
import re
from array import array
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from backfill.domain.results import OUTPUT, ResultKind

#: bytes asked of the blob store per streamed piece
CHUNK = 1 << 20
#: most useful bytes gathered into one group of ranged reads; lines this long are streamed
READ_CAP = 4 << 20
#: most bytes of whole segments the index pass keeps for the copy (per shard)
HOLD = 2 * READ_CAP
#: bytes between two wanted records that one ranged read may span and drop (headers, the
#: records of the other kind); at most READ_CAP of them per group
MAX_GAP = 64 << 10
#: longest header `<line_no> <kind> ` accepted before a record is declared malformed
_MAX_HEADER = 24
_KINDS: dict[bytes, ResultKind] = {kind.value: kind for kind in ResultKind}
#: a regex class matching the byte of any kind: `[oe]`
_KIND = b"[%s]" % b"".join(_KINDS)
_BY_SEGMENT = operator.itemgetter(2, 3)  # RecordPlace: (segment, offset)
_HEADER_PREFIX = re.compile(rb"\d{0,20}( (" + _KIND + rb")?)?")


class SegmentSource(Protocol):
    """What the merge reads segments through (`Blobs` is one)."""

    def stream(
        self, path: str, start: int = 0, end: int | None = None, chunk_size: int = CHUNK
    ) -> AsyncIterator[bytes]: ...

    async def get_range(self, path: str, start: int, end: int) -> bytes: ...


class RecordPlace(NamedTuple):
    """Where the json line of one record is: `segment` is the index into the shard's list of
    segment paths, `offset`/`length` are of the json line within it (no header, no newline).
    A named tuple, not a dataclass: a shard makes one per line, twice as fast to build."""

    line_no: int
    kind: ResultKind
    segment: int
    offset: int
    length: int


class Read(NamedTuple):
    segment: int
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class ReadGroup:
    """Lines to emit in this order, and the reads that cover them. `streamed`: one long line,
    to be streamed rather than read whole."""

    places: tuple[RecordPlace, ...]
    reads: tuple[Read, ...]
    streamed: bool = False


class LineSplitter:
    """Feed chunks, get the complete lines (without `\\n`) they finish."""

    def __init__(self) -> None:
        self._tail: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        pieces = chunk.split(b"\n")
        if len(pieces) == 1:
            if chunk:
                self._tail.append(chunk)
            return []
        if self._tail:
            self._tail.append(pieces[0])
            pieces[0] = b"".join(self._tail)
        self._tail = [pieces[-1]] if pieces[-1] else []
        del pieces[-1]
        return pieces

    def finish(self) -> bytes | None:
        """The last line if the stream did not end with a newline."""
        if not self._tail:
            return None
        line = b"".join(self._tail)
        self._tail = []
        return line


async def iter_lines(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """Each line of a chunked byte stream (blank ones too, so callers can count lines)."""
    splitter = LineSplitter()
    async for chunk in chunks:
        for line in splitter.feed(chunk):
            yield line
    last = splitter.finish()
    if last is not None:
        yield last


def parse_record(record: bytes) -> tuple[int, ResultKind, bytes]:
    """(line_no, kind, json line) of one record without its newline."""
    no, kind, line = record.split(b" ", 2)
    return int(no), _kind(kind), line


async def iter_records(
    chunks: AsyncIterable[bytes],
) -> AsyncIterator[tuple[int, ResultKind, bytes]]:
    """(line_no, kind, json line) of each record of a segment streamed in chunks."""
    async for record in iter_lines(chunks):
        if record:
            yield parse_record(record)


_RECORD = re.compile(rb"(\d{1,20}) (" + _KIND + rb") [^\n]*\n")
_HEADER = re.compile(rb"(\d{1,20}) (" + _KIND + rb") ")


class RecordIndexer:
    """Feed the chunks of segment number `segment`, get the place of each record's json
    line. Holds at most one header (a few bytes) and the chunk, never a line: a record is
    matched whole only when it ends inside the chunk, and a json line running past the chunk
    is skipped over (its newline searched for) chunk by chunk."""

    def __init__(self, segment: int = 0) -> None:
        self._segment = segment
        self._base = 0  # offset within the segment of the data being scanned
        self._header = b""  # start of a record whose header the last chunk cut
        self._no = 0
        self._kind = OUTPUT
        self._body: int | None = None  # offset of a json line that ran past the last chunk

    def feed(self, chunk: bytes) -> list[RecordPlace]:
        found: list[RecordPlace] = []
        segment = self._segment
        base = self._base
        self._base += len(chunk)
        pos = 0
        if self._body is not None:
            newline = chunk.find(b"\n")
            if newline < 0:
                return found
            length = base + newline - self._body
            found.append(RecordPlace(self._no, self._kind, segment, self._body, length))
            self._body = None
            pos = newline + 1
        elif self._header:
            base -= len(self._header)
            chunk = self._header + chunk
            self._header = b""
        n = len(chunk)
        match = _RECORD.match
        while pos < n:
            if chunk[pos] == 0x0A:  # an empty record: skip it
                pos += 1
                continue
            m = match(chunk, pos)
            if m is not None:
                body = m.end(2) + 1
                end = m.end() - 1
                found.append(RecordPlace(int(m[1]), _KINDS[m[2]], segment, base + body, end - body))
                pos = m.end()
                continue
            self._rest(chunk, pos, base)
            break
        return found

    def _rest(self, chunk: bytes, pos: int, base: int) -> None:
        """The last record of a chunk, cut by its end: remember where its json line starts,
        or the cut header."""
        if chunk.find(b"\n", pos) >= 0:
            raise ValueError("malformed segment record")
        m = _HEADER.match(chunk, pos)
        if m is not None:
            self._no, self._kind = int(m[1]), _KINDS[m[2]]
            self._body = base + m.end()
            return
        rest = chunk[pos:]
        if len(rest) > _MAX_HEADER or not _HEADER_PREFIX.fullmatch(rest):
            raise ValueError("malformed segment record")
        self._header = rest

    def finish(self) -> list[RecordPlace]:
        """The last record if the segment did not end with a newline."""
        if self._header:
            raise ValueError("malformed segment record: truncated header")
        if self._body is None:
            return []
        length = self._base - self._body
        last = RecordPlace(self._no, self._kind, self._segment, self._body, length)
        self._body = None
        return [last]


async def index_records(
    chunks: AsyncIterable[bytes], segment: int = 0
) -> AsyncIterator[RecordPlace]:
    """The place of each record of segment number `segment`, streamed in chunks."""
    indexer = RecordIndexer(segment)
    async for chunk in chunks:
        for place in indexer.feed(chunk):
            yield place
    for place in indexer.finish():
        yield place


def plan_reads(
    places: Iterable[RecordPlace], cap: int = READ_CAP, max_gap: int = MAX_GAP
) -> Iterator[ReadGroup]:
    """Groups of `places` (already in output order), each covering at most `cap` bytes of
    lines plus at most `cap` bytes of gaps; a line of `cap` bytes or more is a group alone."""
    group: list[RecordPlace] = []
    size = 0
    for place in places:
        length = place[4]
        if length >= cap:
            if group:
                yield _group(group, cap, max_gap)
                group, size = [], 0
            read = Read(place.segment, place.offset, place.offset + length)
            yield ReadGroup((place,), (read,), streamed=True)
            continue
        if group and size + length > cap:
            yield _group(group, cap, max_gap)
            group, size = [], 0
        group.append(place)
        size += length
    if group:
        yield _group(group, cap, max_gap)


def _group(places: list[RecordPlace], cap: int, max_gap: int) -> ReadGroup:
    reads: list[Read] = []
    waste = 0
    segment = start = end = -1
    for _, _, seg, offset, length in sorted(places, key=_BY_SEGMENT):
        if seg == segment:
            gap = offset - end
            if 0 <= gap <= max_gap and waste + gap <= cap:
                end = offset + length
                waste += gap
                continue
        if segment >= 0:
            reads.append(Read(segment, start, end))
        segment, start, end = seg, offset, offset + length
    reads.append(Read(segment, start, end))
    return ReadGroup(tuple(places), tuple(reads))


def pack_places(places: Iterable[RecordPlace]) -> array[int]:
    """Places of one kind as 4 ints each (32 bytes a line), to keep between passes."""
    return array("q", (v for p in places for v in (p.line_no, p.segment, p.offset, p.length)))


def unpack_places(packed: array[int], kind: ResultKind) -> dict[int, RecordPlace]:
    it = iter(packed)
    return {
        no: RecordPlace(no, kind, seg, off, n)
        for no, seg, off, n in zip(it, it, it, it, strict=True)
    }


@dataclass
class ShardIndex:
    """A shard's merge plan: the place of the first record of each line, and the segments the
    index pass read whole within `HOLD` bytes in all (segment -> bytes), which the copy then
    slices instead of reading again: small lines cost one read per segment, as loading the
    segments did, while a segment of large answers is never held."""

    places: dict[int, RecordPlace]
    held: dict[int, bytes] = field(default_factory=dict)


async def index_shard(source: SegmentSource, paths: Sequence[str], hold: int = HOLD) -> ShardIndex:
    """The first record of each line over a shard's segments (in recorded order)."""
    index = ShardIndex({})
    places = index.places
    room = hold
    for segment, path in enumerate(paths):
        indexer = RecordIndexer(segment)
        pieces: list[bytes] | None = []
        async for chunk in source.stream(path):
            for place in indexer.feed(chunk):
                places.setdefault(place.line_no, place)
            if pieces is not None:
                if len(chunk) <= room:
                    pieces.append(chunk)
                    room -= len(chunk)
                else:
                    room += sum(len(p) for p in pieces)
                    pieces = None
        for place in indexer.finish():
            places.setdefault(place.line_no, place)
        if pieces:
            index.held[segment] = pieces[0] if len(pieces) == 1 else b"".join(pieces)
    return index


async def shard_lines(
    source: SegmentSource,
    paths: Sequence[str],
    index: ShardIndex,
    kind: ResultKind,
    extra: AsyncIterator[tuple[int, bytes]] | None = None,
) -> AsyncIterator[bytes]:
    """The json lines of `kind` (each with its newline) in input order, in chunks of about
    `READ_CAP` bytes; lines from `extra` (`(line_no, line)` in ascending order, for lines no
    segment has) are merged in at their place."""
    wanted = sorted(p for p in index.places.values() if p.kind == kind)  # by line number
    out: list[bytes | memoryview] = []
    pending: tuple[int, bytes] | None = None

    async def fill(before: int | None) -> None:
        """Move `extra` lines numbered below `before` (all if None) into `out`."""
        nonlocal pending, extra
        while extra is not None:
            if pending is None:
                pending = await anext(extra, None)
                if pending is None:
                    extra = None
                    return
            if before is not None and pending[0] >= before:
                return
            out.append(pending[1])
            out.append(b"\n")
            pending = None

    for group in plan_reads(wanted):
        if group.streamed:
            place = group.places[0]
            await fill(place.line_no)
            if out:
                yield b"".join(out)
                out = []
            read = group.reads[0]
            whole = index.held.get(read.segment)
            if whole is not None:
                for at in range(read.start, read.end, CHUNK):
                    yield whole[at : min(at + CHUNK, read.end)]
            else:
                async for piece in source.stream(paths[read.segment], read.start, read.end):
                    yield piece
            yield b"\n"
            continue
        lookup = await _read(source, paths, group.reads, index.held)
        for line_no, _, segment, offset, length in group.places:
            if extra is not None or pending is not None:
                await fill(line_no)
            starts, views = lookup[segment]
            i = 0 if len(starts) == 1 else bisect.bisect_right(starts, offset) - 1
            at = offset - starts[i]
            out.append(views[i][at : at + length])
            out.append(b"\n")
        yield b"".join(out)
        out = []
        del lookup
    await fill(None)
    if out:
        yield b"".join(out)


async def _read(
    source: SegmentSource, paths: Sequence[str], reads: Sequence[Read], held: dict[int, bytes]
) -> dict[int, tuple[list[int], list[memoryview]]]:
    """segment -> (start of each read in it, its bytes), reads in ascending order."""
    lookup: dict[int, tuple[list[int], list[memoryview]]] = {}
    for r in reads:
        whole = held.get(r.segment)
        if whole is not None:
            data = memoryview(whole)[r.start : r.end]
        else:
            data = memoryview(await source.get_range(paths[r.segment], r.start, r.end))
        starts, views = lookup.setdefault(r.segment, ([], []))
        starts.append(r.start)
        views.append(data)
    return lookup


def _kind(raw: bytes) -> ResultKind:
    kind = _KINDS.get(raw)
    if kind is None:
        raise ValueError(f"malformed segment record: kind {raw!r}")
    return kind
