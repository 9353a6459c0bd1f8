"""Finalization: merge a batch's segments into its output and error files.

Memory holds a few MB and one shard's index (a few small ints per line), never a shard's bytes
nor even its largest answer: each shard's segments are indexed in one streaming pass and its
lines copied out in input order by ranged reads of a few MB, long lines streamed
(`backfill.domain.segments`), into `put_stream` uploads.

The first file written indexes every shard, so coverage is known before anything is kept:
- COMPLETED: if some shard's segments lack some of its lines, nothing is invented: the upload
  is aborted once every shard is indexed and `ResultsMissing` names the incomplete shards, for
  the scheduler to run those lines again.
- CANCELLED / EXPIRED: requests that never ran get an error line (`batch_cancelled` /
  `batch_expired`) at their place in input order, their custom ids streamed from the shard's
  byte range of the input file.
The second file skips the shards whose segments recorded nothing of its kind (the segments'
counts say so) and that lack no line, and takes the places of the error lines from the first
pass (kept as 4 ints a line, up to a bound) rather than reading the segments twice.
"""

from __future__ import annotations

import asyncio
from array import array
from collections import defaultdict
from collections.abc import AsyncIterator

from backfill.blobs.base import Blobs
from backfill.domain import paths
from backfill.domain.finalize import result_file_id, unrun_requests
from backfill.domain.records import BatchRecord, FileRecord, Segment, Shard
from backfill.domain.results import (
    CANCELLED_MESSAGE,
    ERROR,
    EXPIRED_MESSAGE,
    OUTPUT,
    ResultKind,
    error_line,
)
from backfill.domain.segments import (
    CHUNK,
    RecordPlace,
    ShardIndex,
    index_shard,
    iter_lines,
    pack_places,
    shard_lines,
    unpack_places,
)
from backfill.domain.statuses import BatchStatus
from backfill.errors import ResultsMissing
from backfill.store.base import Store

#: error places the output pass keeps for the error pass (32 bytes each: 4 MB at most), so
#: the shards with errors need not be indexed a second time
_KEPT_PLACES = 125_000


async def finalize(
    store: Store,
    blobs: Blobs,
    batch: BatchRecord,
    final: BatchStatus,
    from_statuses: frozenset[BatchStatus],
    now: int,
) -> BatchRecord | None:
    shards = await asyncio.to_thread(store.shards, batch.id)
    segments = await asyncio.to_thread(store.segments, batch.id)
    by_shard: dict[int, list[Segment]] = defaultdict(list)
    for seg in segments:
        by_shard[seg.shard_index].append(seg)
    unrun = sum(max(0, s.count - s.done) for s in shards)
    completed = batch.completed
    failed = batch.failed + unrun
    input_file = await asyncio.to_thread(store.get_file, batch.input_file_id)
    input_path = input_file.blob_path if input_file else ""
    reason = (
        ("batch_cancelled", CANCELLED_MESSAGE)
        if final is BatchStatus.CANCELLED
        else ("batch_expired", EXPIRED_MESSAGE)
    )

    lacking: dict[int, int] = {}  # shard index -> lines its segments lack
    indexed = False  # a pass over every shard has filled `lacking`
    kept: dict[int, array[int]] = {}  # shard index -> its error places, from the first pass
    budget = _KEPT_PLACES

    async def lines(kind: ResultKind) -> AsyncIterator[bytes]:
        nonlocal indexed, budget
        first = not indexed
        for shard in shards:
            segs = by_shard.get(shard.index, [])
            if not first and shard.index not in lacking and not _recorded(segs, kind):
                continue
            seg_paths = [seg.blob_path for seg in segs]
            if shard.index in kept and shard.index not in lacking:
                index = ShardIndex(unpack_places(kept.pop(shard.index), kind))
            else:
                index = await index_shard(blobs, seg_paths)
            if first and len(index.places) < shard.count:
                lacking[shard.index] = shard.count - len(index.places)
            if first and kind == OUTPUT and shard.index not in lacking and _recorded(segs, ERROR):
                errors = [p for p in index.places.values() if p.kind == ERROR]
                if 0 < len(errors) <= budget:
                    kept[shard.index] = pack_places(errors)
                    budget -= len(errors)
            extra = None
            if final is BatchStatus.COMPLETED:
                if lacking:
                    continue  # this file is not kept: only find every incomplete shard
            elif kind == ERROR and shard.index in lacking and input_path:
                extra = _unrun_lines(blobs, input_path, shard, index.places, reason)
            async for chunk in shard_lines(blobs, seg_paths, index, kind, extra):
                yield chunk
        indexed = True
        if final is BatchStatus.COMPLETED and lacking:
            raise ResultsMissing(batch.id, sorted(lacking))

    fields: dict[str, object] = {"completed": completed, "failed": failed}
    expires_at = now + batch.output_expires_after if batch.output_expires_after else None
    for kind, count, field_name, suffix in (
        (OUTPUT, completed, "output_file_id", "output"),
        (ERROR, failed, "error_file_id", "error"),
    ):
        if count <= 0:
            fields[field_name] = None
            continue
        file_id = result_file_id(batch.id, suffix)
        path = paths.file_path(file_id)
        size = await blobs.put_stream(path, lines(kind))
        existing = await asyncio.to_thread(store.get_file, file_id)
        if existing is None:
            await asyncio.to_thread(
                store.insert_file,
                FileRecord(
                    id=file_id,
                    project_id=batch.project_id,
                    filename=f"{batch.id}_{suffix}.jsonl",
                    purpose="batch_output",
                    bytes=size,
                    created_at=now,
                    blob_path=path,
                    expires_at=expires_at,
                ),
            )
        fields[field_name] = file_id
    stamp = {
        BatchStatus.COMPLETED: "completed_at",
        BatchStatus.CANCELLED: "cancelled_at",
        BatchStatus.EXPIRED: "expired_at",
    }[final]
    fields[stamp] = now
    done = await asyncio.to_thread(store.transition, batch.id, from_statuses, final, **fields)
    if done is not None:
        await blobs.delete_prefix(paths.batch_prefix(batch.id))
    return done


def _recorded(segments: list[Segment], kind: ResultKind) -> bool:
    return any((seg.completed if kind == OUTPUT else seg.failed) > 0 for seg in segments)


async def _unrun_lines(
    blobs: Blobs, path: str, shard: Shard, done: dict[int, RecordPlace], reason: tuple[str, str]
) -> AsyncIterator[tuple[int, bytes]]:
    """Error lines for the shard's requests that no segment has, in input order."""
    chunks = blobs.stream(path, shard.start, shard.end, chunk_size=CHUNK)
    async for line_no, custom_id in unrun_requests(iter_lines(chunks), shard.first_line, done):
        yield line_no, error_line(custom_id, *reason)


def shards_finished(shards: list[Shard]) -> bool:
    return bool(shards) and all(s.status == "done" for s in shards)
