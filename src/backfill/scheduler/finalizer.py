"""Finalization: merge a batch's segments into its output and error files.

Streams shard by shard: memory holds one shard's results at a time, never the whole batch.
Requests that never ran (cancelled or expired batches) get an error line with
`batch_cancelled` / `batch_expired`, read back from the shard's byte range of the input file.
Output lines come in input order.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator

from backfill.blobs.base import Blobs
from backfill.domain.finalize import merge_segments, result_file_id
from backfill.domain.inputs import iter_requests
from backfill.domain.records import BatchRecord, FileRecord, Segment, Shard
from backfill.domain.results import (
    CANCELLED_MESSAGE,
    ERROR,
    EXPIRED_MESSAGE,
    OUTPUT,
    error_line,
)
from backfill.domain.statuses import BatchStatus
from backfill.store.base import Store


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

    async def lines(kind: bytes) -> AsyncIterator[bytes]:
        for shard in shards:
            datas = [await blobs.get(seg.blob_path) for seg in by_shard.get(shard.index, [])]
            merged = merge_segments(datas)
            del datas
            if kind == ERROR and len(merged) < shard.count and input_path:
                raw = await blobs.get_range(input_path, shard.start, shard.end)
                for line_no, custom_id, _ in iter_requests(raw, shard.first_line):
                    if line_no not in merged:
                        merged[line_no] = (ERROR, error_line(custom_id, *reason))
            chunk = b"".join(merged[n][1] + b"\n" for n in sorted(merged) if merged[n][0] == kind)
            if chunk:
                yield chunk

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
        path = f"files/{file_id}"
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
        await blobs.delete_prefix(f"batches/{batch.id}")
    return done


def shards_finished(shards: list[Shard]) -> bool:
    return bool(shards) and all(s.status == "done" for s in shards)
