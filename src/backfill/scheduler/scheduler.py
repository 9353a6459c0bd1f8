"""The scheduler loop: every tick it scans the store for batches that need a duty done.

- every `retention_interval`: delete files past their `expires_at` (not inputs in use), and
  collect crash debris (`collector.py`, itself at most once per `debris_interval_seconds`)
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

While the store or the blobs fail (a database locked elsewhere, a full disk), a failing tick
waits out a growing back-off, a failing duty is not started again until its back-off has
passed, and the outage is logged once when it begins and once when it ends
(`backfill.outages`), not with a traceback per tick.
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
from backfill.domain.statuses import BatchStatus, StopReason
from backfill.domain.validation import TokenCounter, ValidationLimits
from backfill.errors import ResultsMissing
from backfill.outages import Outages
from backfill.scheduler.collector import run_collector
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
        token_counters: Mapping[str, TokenCounter] | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._blobs = blobs
        self._served = served
        #: model -> its in-process engine's prompt-token counter (others are estimated)
        self._token_counters = token_counters or {}
        self._clock = clock
        self._busy: set[str] = set()
        self._next_retention = 0.0
        self.owner = "scheduler-" + new_token()[:12]
        self._claim_seconds = max(settings.lease_seconds, 5.0)
        self._tasks: set[asyncio.Task[None]] = set()
        #: store / blob store failures: logged once per episode, waited out with back-off
        self._outages = Outages(
            log,
            base=settings.scheduler_interval,
            cap=settings.outage_backoff_max,
            slack=settings.store_busy_timeout,
            clock=clock,
        )
        self._limits = ValidationLimits(
            max_requests=settings.max_requests_per_batch,
            max_embedding_inputs=settings.max_embedding_inputs_per_batch,
            max_errors=settings.max_validation_errors,
            max_line_bytes=settings.max_line_bytes,
            shard_size=settings.shard_size,
            max_enqueued_tokens=settings.max_enqueued_tokens,
            default_output_tokens=settings.enqueued_output_tokens,
        )

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            delay = self._settings.scheduler_interval
            try:
                await self.tick()
                self._outages.succeeded()
            except Exception as exc:
                if not self._outages.failed(exc):
                    log.exception("scheduler tick failed")
                delay = self._outages.delay  # backs off while the store or the blobs fail
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
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
                self._store.update_batch, batch.id, [S.IN_PROGRESS], stop_reason=StopReason.EXPIRED
            )
            if updated is None:
                return
            batch = updated
        shards = await asyncio.to_thread(self._store.shards, batch.id)
        if batch.stop_reason == StopReason.EXPIRED:
            if not _live_leases(shards, now):
                self._spawn(
                    batch.id,
                    "finalize",
                    functools.partial(self._finish, batch, S.EXPIRED, {S.IN_PROGRESS}),
                )
        elif shards_finished(shards):
            short = [s.index for s in shards if s.done < s.count]
            if short:
                # Finished, yet the recorded outcomes do not cover every line: run the
                # missing ones again rather than finalize with holes.
                n = await asyncio.to_thread(self._store.reopen_shards, batch.id, short)
                log.error(
                    "batch %s: shards %s finished without an outcome for every line; "
                    "reopened %d to run the missing requests",
                    batch.id,
                    short,
                    n,
                )
                return
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
        await run_collector(self._store, self._blobs, self._settings, self.owner, self._clock())
        try:
            n = await delete_expired_files(self._store, self._blobs, int(self._clock()))
        except Exception as exc:
            if not self._outages.failed(exc):
                log.exception("retention failed")
            return
        if n:
            log.info("retention: deleted %d expired files", n)

    def _spawn(self, batch_id: str, duty: str, work: Callable[[], Awaitable[None]]) -> None:
        """Run a duty for a batch once in this process, and only while this process holds the
        store claim `duty:batch_id` (renewed as it runs), so no two processes run it at once.
        A duty the store or the blobs failed is not started again for the back-off delay."""
        self._busy.add(batch_id)
        name = f"{duty}:{batch_id}"

        async def guarded() -> None:
            renew: asyncio.Task[None] | None = None
            retry_in = 0.0
            try:
                if not await asyncio.to_thread(
                    self._store.claim, name, self.owner, self._clock(), self._claim_seconds
                ):
                    return
                renew = asyncio.create_task(self._renew_claim(name))
                await work()
                self._outages.succeeded()
            except Exception as exc:
                if self._outages.failed(exc):
                    retry_in = self._outages.delay
                else:
                    log.exception("%s failed; it will be retried", name)
            finally:
                if renew is not None:
                    renew.cancel()
                    # a renewal that failed (the store did) must not log "never retrieved"
                    await asyncio.gather(renew, return_exceptions=True)
                    with contextlib.suppress(Exception):
                        await asyncio.to_thread(self._store.release_claim, name, self.owner)
                if retry_in:
                    asyncio.get_running_loop().call_later(retry_in, self._busy.discard, batch_id)
                else:
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
            self._store,
            self._blobs,
            batch,
            self._served,
            self._limits,
            int(self._clock()),
            self._token_counters,
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
        try:
            done = await finalize(
                self._store, self._blobs, fresh, final, frozenset(sources), int(self._clock())
            )
        except ResultsMissing as missing:
            await self._rerun_missing(missing)
            return
        if done is not None:
            log.info("batch %s: %s", batch.id, done.status)

    async def _rerun_missing(self, missing: ResultsMissing) -> None:
        """A batch found incomplete while finalizing goes back to `in_progress` with the
        shards that lack outcomes reopened; the worker runs only the lines not yet recorded."""
        back = await asyncio.to_thread(
            self._store.transition, missing.batch_id, [S.FINALIZING], S.IN_PROGRESS
        )
        n = await asyncio.to_thread(self._store.reopen_shards, missing.batch_id, missing.shards)
        log.error(
            "batch %s: lines without an outcome in shards %s; %s, reopened %d shards",
            missing.batch_id,
            missing.shards,
            "back to in_progress" if back is not None else "status unchanged",
            n,
        )


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
