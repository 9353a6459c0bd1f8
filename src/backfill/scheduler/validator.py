"""Validation duty: stream a validating batch's input file through the validator and either
start the batch (insert its shards, -> in_progress) or fail it with line-numbered errors.

The CPU work (JSON parsing) runs in a thread one chunk at a time, so the API on the same event
loop stays responsive while a 100 MB file is checked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from backfill.blobs.base import Blobs
from backfill.domain.records import BatchError, BatchRecord
from backfill.domain.statuses import BatchStatus
from backfill.domain.validation import InputValidator, ValidationLimits
from backfill.errors import BlobNotFound
from backfill.store.base import Store

CHUNK = 1 << 20


async def validate_batch(
    store: Store,
    blobs: Blobs,
    batch: BatchRecord,
    served: Mapping[str, frozenset[str]],
    limits: ValidationLimits,
    now: int,
) -> BatchRecord | None:
    file = await asyncio.to_thread(store.get_file, batch.input_file_id)
    errors: list[BatchError] = []
    if file is None:
        errors.append(BatchError("file_not_found", "The input file no longer exists.", None))
    else:
        validator = InputValidator(
            batch_id=batch.id, endpoint=batch.endpoint, served=served, limits=limits
        )
        try:
            async for chunk in blobs.stream(file.blob_path, chunk_size=CHUNK):
                await asyncio.to_thread(validator.feed, chunk)
        except BlobNotFound:
            errors.append(BatchError("file_not_found", "The input file's data is gone.", None))
        else:
            result = await asyncio.to_thread(validator.finish)
            if result.ok:
                return await asyncio.to_thread(
                    store.start_batch,
                    batch.id,
                    result.shards,
                    model=result.model,
                    total=result.total,
                    now=now,
                )
            errors = result.errors
    return await asyncio.to_thread(
        store.transition,
        batch.id,
        [BatchStatus.VALIDATING],
        BatchStatus.FAILED,
        failed_at=now,
        errors=tuple(errors),
    )
