"""The scheduler loop: every tick it scans the store for batches that need a duty done.

- every `retention_interval`: delete files past their `expires_at` (not inputs in use)
- `validating`            -> validate the file, plan shards, start (or fail) the batch
- `in_progress`, all shards done -> `finalizing` -> merge -> `completed`
- `in_progress` past `expires_at` -> mark stop_reason=expired; once no live lease remains,
  finalize as `expired` (finished results kept, the rest `batch_expired`)
- `cancelling`, no live lease -> finalize as `cancelled`
- `finalizing` left behind by a crash -> finalize again (files have deterministic ids)

Every duty runs under a store claim (`validate:<batch>`, `finalize:<batch>`), renewed while it
runs and taken over when its holder dies, so any number of processes can run schedulers; each
state change is also conditional, so even a duty run twice cannot apply twice. Within one
process, a set of busy batch ids keeps a duty from being started twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from backfill.blobs.base import Blobs
from backfill.domain.ids import new_token
from backfill.domain.ordering import admission_warning
from backfill.domain.records import BatchRecord, Shard
from backfill.domain.statuses import BatchStatus
from backfill.domain.validation import ValidationLimits
from backfill.scheduler.finalizer import finalize, shards_finished
from backfill.scheduler.validator import validate_batch
from backfill.settings import Settings
from backfill.store.base import Store

log = logging.getLogger("backfill.scheduler")
S = BatchStatus


class Scheduler:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        blobs: Blobs,
        served: Mapping[str, frozenset[str]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._store = store
        self._blobs = blobs
        self._served = served
        self._clock = clock
        self._busy: set[str] = set()
        self._next_retention = 0.0
        self.owner = "scheduler-" + new_token()[:12]
        self._claim_seconds = max(settings.lease_seconds, 5.0)
        self._tasks: set[asyncio.Task[None]] = set()
        self._limits = ValidationLimits(
            max_requests=settings.max_requests_per_batch,
            max_errors=settings.max_validation_errors,
            max_line_bytes=settings.max_line_bytes,
            shard_size=settings.shard_size,
            max_enqueued_tokens=settings.max_enqueued_tokens,
        )

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.tick()
            except Exception:
                log.exception("scheduler tick failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._settings.scheduler_interval)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def tick(self) -> None:
        if self._clock() >= self._next_retention:
            self._next_retention = self._clock() + self._settings.retention_interval
            await self._retention()
        batches = await asyncio.to_thread(
            self._store.batches_in,
            [S.VALIDATING, S.IN_PROGRESS, S.CANCELLING, S.FINALIZING],
            1000,
        )
        now = self._clock()
        for batch in batches:
            if batch.id in self._busy:
                continue
            if batch.status is S.VALIDATING:
                self._spawn(batch.id, "validate", functools.partial(self._validate, batch))
            elif batch.status is S.FINALIZING:
                self._spawn(
                    batch.id,
                    "finalize",
                    functools.partial(self._finish, batch, S.COMPLETED, {S.FINALIZING}),
                )
            elif batch.status is S.CANCELLING:
                shards = await asyncio.to_thread(self._store.shards, batch.id)
                if not _live_leases(shards, now):
                    self._spawn(
                        batch.id,
                        "finalize",
                        functools.partial(self._finish, batch, S.CANCELLED, {S.CANCELLING}),
                    )
            elif batch.status is S.IN_PROGRESS:
                await self._check_running(batch, now)

    async def _check_running(self, batch: BatchRecord, now: float) -> None:
        if batch.stop_reason is None and now >= batch.expires_at:
            updated = await asyncio.to_thread(
                self._store.update_batch, batch.id, [S.IN_PROGRESS], stop_reason="expired"
            )
            if updated is None:
                return
            batch = updated
        shards = await asyncio.to_thread(self._store.shards, batch.id)
        if batch.stop_reason == "expired":
            if not _live_leases(shards, now):
                self._spawn(
                    batch.id,
                    "finalize",
                    functools.partial(self._finish, batch, S.EXPIRED, {S.IN_PROGRESS}),
                )
        elif shards_finished(shards):
            moved = await asyncio.to_thread(
                self._store.transition,
                batch.id,
                [S.IN_PROGRESS],
                S.FINALIZING,
                finalizing_at=int(now),
            )
            if moved is not None:
                self._spawn(
                    batch.id,
                    "finalize",
                    functools.partial(self._finish, moved, S.COMPLETED, {S.FINALIZING}),
                )

    async def _retention(self) -> None:
        try:
            n = await delete_expired_files(self._store, self._blobs, int(self._clock()))
        except Exception:
            log.exception("retention failed")
            return
        if n:
            log.info("retention: deleted %d expired files", n)

    def _spawn(self, batch_id: str, duty: str, work: Callable[[], Awaitable[None]]) -> None:
        """Run a duty for a batch once in this process, and only while this process holds the
        store claim `duty:batch_id` (renewed as it runs), so no two processes run it at once."""
        self._busy.add(batch_id)
        name = f"{duty}:{batch_id}"

        async def guarded() -> None:
            renew: asyncio.Task[None] | None = None
            try:
                if not await asyncio.to_thread(
                    self._store.claim, name, self.owner, self._clock(), self._claim_seconds
                ):
                    return
                renew = asyncio.create_task(self._renew_claim(name))
                await work()
            except Exception:
                log.exception("%s failed; it will be retried", name)
            finally:
                if renew is not None:
                    renew.cancel()
                    with contextlib.suppress(Exception):
                        await asyncio.to_thread(self._store.release_claim, name, self.owner)
                self._busy.discard(batch_id)

        task = asyncio.create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _renew_claim(self, name: str) -> None:
        while True:
            await asyncio.sleep(self._claim_seconds / 3)
            await asyncio.to_thread(
                self._store.claim, name, self.owner, self._clock(), self._claim_seconds
            )

    async def _validate(self, batch: BatchRecord) -> None:
        result = await validate_batch(
            self._store, self._blobs, batch, self._served, self._limits, int(self._clock())
        )
        if result is not None:
            log.info("batch %s: %s", batch.id, result.status)
            if result.status is S.IN_PROGRESS:
                await self._warn_if_late(result)

    async def _warn_if_late(self, batch: BatchRecord) -> None:
        """Say so on the batch when, at the measured rate of its model, it cannot finish in
        its window (a warning, not a refusal)."""
        now = self._clock()
        running = await asyncio.to_thread(self._store.batches_in, [S.IN_PROGRESS], 1000)
        rate = 0.0
        ahead = 0
        for other in running:
            if other.id == batch.id or other.model != batch.model:
                continue
            done = other.completed + other.failed
            if other.in_progress_at is not None and done > 0:
                rate += done / max(now - other.in_progress_at, 1.0)
            if other.expires_at <= batch.expires_at:
                ahead += max(other.total - done, 0)
        warning = admission_warning(batch.total, batch.expires_at, ahead, rate or None, now)
        if warning is not None:
            await asyncio.to_thread(
                self._store.update_batch, batch.id, [S.IN_PROGRESS], warning=warning
            )

    async def _finish(
        self, batch: BatchRecord, final: BatchStatus, sources: set[BatchStatus]
    ) -> None:
        if final is not S.COMPLETED:
            # A stalled worker whose lease ran out still holds its token: revoke it, so
            # nothing can be recorded once the merge has started.
            await asyncio.to_thread(self._store.revoke_leases, batch.id)
        fresh = await asyncio.to_thread(self._store.get_batch, batch.id)
        if fresh is None or fresh.status not in sources:
            return
        done = await finalize(
            self._store, self._blobs, fresh, final, frozenset(sources), int(self._clock())
        )
        if done is not None:
            log.info("batch %s: %s", batch.id, done.status)


async def delete_expired_files(store: Store, blobs: Blobs, now: int, limit: int = 500) -> int:
    """Retention: delete files past their `expires_at` (rows first, then bytes). Files that
    are still the input of an unfinished batch are kept until it finishes."""
    deleted = 0
    for file in await asyncio.to_thread(store.expired_files, now, limit):
        if await asyncio.to_thread(store.file_in_use, file.id):
            continue
        gone = await asyncio.to_thread(store.delete_file, file.id)
        if gone is not None:
            await blobs.delete(gone.blob_path)
            deleted += 1
    return deleted


def _live_leases(shards: list[Shard], now: float) -> bool:
    return any(
        s.status == "leased" and s.lease_expires_at is not None and s.lease_expires_at > now
        for s in shards
    )
