"""Validation duty: stream a validating batch's input file through the validator and either
start the batch (insert its shards, -> in_progress) or fail it with line-numbered errors.

The batch's counted tokens go to `start_batch`, which records them and checks the project's
enqueued-token limit in the same transaction (see `Store.start_batch`); over the limit, the
batch fails with `token_limit_exceeded` and OpenAI's message, as at OpenAI.

The CPU work (JSON parsing) runs in a thread one chunk at a time, so the API on the same event
loop stays responsive while a 100 MB file is checked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from backfill.blobs.base import Blobs
from backfill.domain.records import BatchError, BatchRecord
from backfill.domain.statuses import BatchStatus
from backfill.domain.validation import InputValidator, TokenCounter, ValidationLimits
from backfill.errors import BlobNotFound, QuotaExceeded
from backfill.store.base import Store

CHUNK = 1 << 20


async def validate_batch(
    store: Store,
    blobs: Blobs,
    batch: BatchRecord,
    served: Mapping[str, frozenset[str]],
    limits: ValidationLimits,
    now: int,
    token_counters: Mapping[str, TokenCounter] | None = None,
) -> BatchRecord | None:
    file = await asyncio.to_thread(store.get_file, batch.input_file_id)
    errors: list[BatchError] = []
    if file is None:
        errors.append(BatchError("file_not_found", "The input file no longer exists.", None))
    else:
        validator = InputValidator(
            batch_id=batch.id,
            endpoint=batch.endpoint,
            served=served,
            limits=limits,
            token_counters=token_counters,
        )
        try:
            async for chunk in blobs.stream(file.blob_path, chunk_size=CHUNK):
                await asyncio.to_thread(validator.feed, chunk)
        except BlobNotFound:
            errors.append(BatchError("file_not_found", "The input file's data is gone.", None))
        else:
            result = await asyncio.to_thread(validator.finish)
            if result.ok:
                try:
                    return await asyncio.to_thread(
                        store.start_batch,
                        batch.id,
                        result.shards,
                        model=result.model,
                        total=result.total,
                        now=now,
                        enqueued_tokens=result.estimated_tokens,
                    )
                except QuotaExceeded as exc:
                    errors = [BatchError(exc.code or "token_limit_exceeded", exc.message, None)]
            else:
                errors = result.errors
    return await asyncio.to_thread(
        store.transition,
        batch.id,
        [BatchStatus.VALIDATING],
        BatchStatus.FAILED,
        failed_at=now,
        errors=tuple(errors),
    )
