"""Running one leased shard: read its requests, dispatch them, checkpoint results.

Results are buffered in memory and flushed as append-only *segments*: first the segment object
goes to the blob store, then the store records it (fenced by the lease token) together with the
batch's counts and usage. That is one store write per segment, not per request. A request is
"done" only once a recorded segment holds it; a worker that dies loses at most its unflushed
buffer, and whoever resumes the shard skips the line numbers found in recorded segments.

Segment paths carry the lease token, so a worker that lost its lease can never overwrite a
segment that the new lease holder recorded.

A heartbeat renews the lease and watches the batch: when it is being cancelled or has expired
the run stops dispatching, aborts what is in flight, flushes what finished and gives the shard
back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from backfill.blobs.base import Blobs
from backfill.dispatch.dispatcher import Dispatcher
from backfill.domain.inputs import iter_requests
from backfill.domain.records import BatchRecord, Segment, Shard, Usage
from backfill.domain.results import (
    ERROR,
    OUTPUT,
    error_line,
    iter_segment,
    parse_body,
    response_line,
    segment_record,
    usage_from_body,
)
from backfill.domain.statuses import BatchStatus
from backfill.errors import LeaseLost
from backfill.settings import Settings
from backfill.store.base import Store

log = logging.getLogger("backfill.worker")


class ShardRun:
    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        blobs: Blobs,
        dispatchers: dict[str, Dispatcher],
        shard: Shard,
        token: str,
        owner: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._owner = owner or None
        self._settings = settings
        self._store = store
        self._blobs = blobs
        self._dispatchers = dispatchers
        self.shard = shard
        self._token = token
        self._clock = clock
        self._buffer: list[bytes] = []
        self._completed = 0
        self._failed = 0
        self._usage = Usage()
        self._seq = 0
        self._flush_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._lost = False
        self._flush_wanted = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        shard = self.shard
        batch = await asyncio.to_thread(self._store.get_batch, shard.batch_id)
        if batch is None:
            return
        raw, done = await self._load(batch)
        heartbeat = asyncio.create_task(self._heartbeat())
        flusher = asyncio.create_task(self._flusher())
        try:
            await self._dispatch_all(batch, raw, done)
            await self._flush()
            if self._stop.is_set():
                await asyncio.to_thread(
                    self._store.release_shard, shard.batch_id, shard.index, self._token
                )
            else:
                await asyncio.to_thread(
                    self._store.finish_shard, shard.batch_id, shard.index, self._token
                )
        except LeaseLost:
            log.warning("lost the lease on %s/%d; stopping", shard.batch_id, shard.index)
        finally:
            heartbeat.cancel()
            flusher.cancel()
            await asyncio.gather(heartbeat, flusher, return_exceptions=True)

    async def _dispatch_all(self, batch: BatchRecord, raw: bytes, done: set[int]) -> None:
        """Start requests lazily, at most `cap` at a time, so memory stays bounded by the
        window, not the shard; on stop, abort whatever is in flight."""
        dispatcher = self._dispatchers.get(batch.model or "")
        # the configured ceiling, not the current limit: the governor may raise it later;
        # twice that when its governor may defer long prompts, so the short ones keep a full
        # window
        cap = max(16, dispatcher.max_concurrency if dispatcher is not None else 16)
        if dispatcher is not None and dispatcher.may_defer:
            cap *= 2
        # long prompts may wait behind short ones only in the first half of the window
        defer_until = batch.created_at + (batch.expires_at - batch.created_at) / 2
        slots = asyncio.Semaphore(cap)
        running: set[asyncio.Task[None]] = set()

        def finished(task: asyncio.Task[None]) -> None:
            running.discard(task)
            slots.release()

        async def abort_on_stop() -> None:
            await self._stop.wait()
            # Cancel/expiry/shutdown: let what is in flight finish within the grace period
            # (its results are kept); a lost lease aborts at once (nothing can be recorded).
            grace = self._settings.cancel_grace_seconds
            if running and not self._lost and grace > 0:
                await asyncio.wait(list(running), timeout=grace)
            for task in list(running):
                task.cancel()

        watcher = asyncio.create_task(abort_on_stop())
        try:
            for line_no, cid, body in iter_requests(raw, self.shard.first_line):
                if line_no in done:
                    continue
                await slots.acquire()
                if self._stop.is_set():
                    slots.release()
                    break
                task = asyncio.create_task(
                    self._one(
                        dispatcher,
                        batch.endpoint,
                        line_no,
                        cid,
                        body,
                        defer_until=defer_until,
                    )
                )
                running.add(task)
                task.add_done_callback(finished)
            if running:
                await asyncio.gather(*list(running), return_exceptions=True)
        finally:
            watcher.cancel()

    async def _load(self, batch: BatchRecord) -> tuple[bytes, set[int]]:
        """The shard's input bytes and the line numbers already recorded as done."""
        shard = self.shard
        done: set[int] = set()
        segments = await asyncio.to_thread(self._store.segments, shard.batch_id, shard.index)
        for seg in segments:
            data = await self._blobs.get(seg.blob_path)
            done.update(no for no, _, _ in iter_segment(data))
            self._seq = max(self._seq, seg.seq + 1)
        file = await asyncio.to_thread(self._store.get_file, batch.input_file_id)
        if file is None:
            return b"", done
        raw = await self._blobs.get_range(file.blob_path, shard.start, shard.end)
        return raw, done

    async def _one(
        self,
        dispatcher: Dispatcher | None,
        endpoint: str,
        line_no: int,
        custom_id: str,
        body: dict[str, Any],
        *,
        defer_until: float,
    ) -> None:
        if dispatcher is None:
            line = error_line(custom_id, "model_not_found", "The model is no longer served.")
            self._add(line_no, ERROR, line, Usage(), ok=False)
            return
        outcome = await dispatcher.run(endpoint, body, defer_until=defer_until)
        if outcome.status is None:
            line = error_line(
                custom_id, outcome.error_code or "upstream_unavailable", outcome.message or ""
            )
            self._add(line_no, ERROR, line, Usage(), ok=False)
            return
        parsed = parse_body(outcome.body, outcome.status)
        usage = usage_from_body(parsed)
        line = response_line(custom_id, outcome.status, parsed, outcome.request_id)
        self._add(line_no, OUTPUT if outcome.ok else ERROR, line, usage, ok=outcome.ok)

    def _add(self, line_no: int, kind: bytes, line: bytes, usage: Usage, *, ok: bool) -> None:
        self._buffer.append(segment_record(line_no, kind, line))
        if ok:
            self._completed += 1
        else:
            self._failed += 1
        if usage.input_tokens or usage.output_tokens:
            self._usage = self._usage + usage
        if len(self._buffer) >= self._settings.flush_every_requests:
            self._flush_wanted.set()

    async def _flusher(self) -> None:
        interval = self._settings.flush_every_seconds
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush_wanted.wait(), interval)
            self._flush_wanted.clear()
            try:
                await self._flush()
            except LeaseLost:
                self._lost = True
                self._stop.set()
                return

    async def _flush(self) -> None:
        async with self._flush_lock:
            if self._lost:
                raise LeaseLost("lease lost")
            if not self._buffer:
                return
            records, self._buffer = self._buffer, []
            completed, failed, usage = self._completed, self._failed, self._usage
            self._completed, self._failed, self._usage = 0, 0, Usage()
            shard = self.shard
            path = (
                f"batches/{shard.batch_id}/seg/{shard.index:05d}-{self._seq:06d}-{self._token[:12]}"
            )
            await self._blobs.put(path, b"".join(records))
            segment = Segment(
                batch_id=shard.batch_id,
                shard_index=shard.index,
                seq=self._seq,
                blob_path=path,
                completed=completed,
                failed=failed,
                usage=usage,
                owner=self._owner,
            )
            ok = await asyncio.to_thread(self._store.record_segment, segment, self._token)
            if not ok:
                self._lost = True
                await self._blobs.delete(path)
                raise LeaseLost(f"lease on {shard.batch_id}/{shard.index} lost")
            self._seq += 1

    async def _heartbeat(self) -> None:
        """Renew the lease until the run ends (also while a cancel's grace period lets
        in-flight requests finish: the scheduler finalizes only once no lease is live), and
        tell the run to stop when its batch is cancelled, expired or gone."""
        shard = self.shard
        lease = self._settings.lease_seconds
        interval = min(1.0, lease / 3)
        last_renew = self._clock()
        while True:
            await asyncio.sleep(interval)
            now = self._clock()
            if now - last_renew >= lease / 3:
                ok = await asyncio.to_thread(
                    self._store.renew_lease, shard.batch_id, shard.index, self._token, now, lease
                )
                if not ok:
                    self._lost = True
                    self._stop.set()
                    return
                last_renew = now
            if not self._stop.is_set():
                batch = await asyncio.to_thread(self._store.get_batch, shard.batch_id)
                if (
                    batch is None
                    or batch.status is not BatchStatus.IN_PROGRESS
                    or batch.stop_reason
                ):
                    self._stop.set()
