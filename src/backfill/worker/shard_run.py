"""Running one leased shard: read its requests, dispatch them, checkpoint results.

Results are buffered in memory and flushed as append-only *segments*: first the segment object
goes to the blob store, then the store records it (fenced by the lease token) together with the
batch's counts and usage. That is one store write per segment, not per request. A request is
"done" only once a recorded segment holds it; a worker that dies loses at most its unflushed
buffer, and whoever resumes the shard skips the line numbers found in recorded segments.

Segment paths carry the lease token, so a worker that lost its lease can never overwrite a
segment that the new lease holder recorded.

A heartbeat renews the lease and watches the batch: when it is being cancelled or has expired
the run stops sending at once (requests waiting inside backfill are never sent; only those
already at the engine may finish within the grace period), flushes what finished and gives the
shard back.

The invariant, kept here: every request the run starts ends with exactly one recorded outcome,
or with none at all because the run stopped before it reached the engine (it is then re-run by
the next owner, or given `batch_cancelled`/`batch_expired` by finalization). So:
- each request's line comes from `outcomes.run_request` (an exception inside one request is
  that line's `internal_error` and a logged traceback, never a silent hole);
- a checkpoint that fails (store locked, blob write refused, disk full) keeps its results: the
  same segment is written again with backoff until it is recorded or the lease is lost (then
  the next owner re-runs those requests, as after a kill). While checkpoints fail, no new
  request starts once `_max_buffered` results wait, so memory stays bounded;
- an input read that fails part-way starts nothing more: the requests already started end
  and their results are recorded before the error ends the run; the shard is not finished,
  so the lines not read run on the next lease (after this one runs out, as for any error);
- the shard is finished only when every line is accounted for; otherwise it is given back.

Order (`settings.plan_prefixes`, on by default): the run first reads the shard once and keeps,
per line not yet recorded, a key of a few dozen bytes (`domain/planning.py`: prefix group,
expected output length, deeper prefix, body digest), then dispatches in key order, reading the
bodies again `in_hand` lines at a time with coalesced ranged reads. Requests sharing a prompt
prefix reach the engine together, and identical bodies side by side (the dispatcher sends them
once). Results still go to segments by line number, so the output keeps input order and a
resumed run skips recorded lines exactly as in file order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from backfill.blobs.base import Blobs
from backfill.dispatch.dispatcher import Dispatcher
from backfill.domain import paths
from backfill.domain.duplicates import body_key
from backfill.domain.inputs import iter_requests, numbered_spans, parse_request
from backfill.domain.planning import (
    Planned,
    chunks,
    coalesce,
    dispatch_key,
    group_of,
    plan,
)
from backfill.domain.pricing import PriceTable
from backfill.domain.records import BatchRecord, Cost, Segment, Shard, Usage
from backfill.domain.results import ResultKind, segment_record
from backfill.domain.segments import index_records, iter_lines
from backfill.domain.statuses import BatchStatus
from backfill.errors import LeaseLost
from backfill.outages import outage_of
from backfill.settings import Settings
from backfill.store.base import Store
from backfill.worker.outcomes import run_request

#: a request to start: line number, custom_id, body, prefix group (None: not planned)
Request = tuple[int, str, dict[str, Any], bytes | None]

log = logging.getLogger("backfill.worker")

#: checkpoint as soon as this many bytes of results wait, whatever the request count
FLUSH_BYTES = 32 * 1024 * 1024
#: bytes of the shard's input read at a time
INPUT_CHUNK = 1 << 20
#: longest wait between two attempts at a failing checkpoint
MAX_FLUSH_BACKOFF = 5.0


@dataclass(frozen=True, slots=True)
class _Result:
    line_no: int
    record: bytes
    ok: bool
    usage: Usage
    engine_seconds: float


@dataclass(slots=True)
class _Pending:
    """A segment cut from the buffer and not yet recorded: retried as it is, never re-cut, so
    a write that did land (or half-landed) is repeated with the same content."""

    seq: int
    path: str
    data: bytes
    completed: int
    failed: int
    usage: Usage
    engine_ms: int
    cost: Cost | None
    at: int


class ShardRun:
    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        blobs: Blobs,
        dispatchers: dict[str, Dispatcher],
        shard: Shard,
        batch: BatchRecord,
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
        self._batch = batch  # as the worker read it when it leased the shard
        self._token = token
        self._clock = clock
        self._prices = PriceTable.from_config(settings.prices, settings.batch_discount)
        self._model = batch.model
        self._buffer: list[_Result] = []
        self._buffered_bytes = 0
        self._pending: _Pending | None = None
        self._seq = 0
        self._flush_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._lost = False
        self._flush_wanted = asyncio.Event()
        self._room = asyncio.Event()  # set while the buffer may take more results
        self._room.set()
        self._max_buffered = max(4 * settings.flush_every_requests, 64)
        #: line numbers given an outcome by this run (each exactly once)
        self._accounted: set[int] = set()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        shard = self.shard
        batch = self._batch
        requests = await self._load(batch)
        heartbeat = asyncio.create_task(self._heartbeat())
        flusher = asyncio.create_task(self._flusher())
        try:
            try:
                started = await self._dispatch_all(batch, requests)
            except Exception:
                await self._record_all()  # what ran before the input read failed
                raise
            await self._record_all()
            missing = len(started - self._accounted)
            if missing and not self._stop.is_set():
                log.error(
                    "shard %s/%d: %d requests ended without an outcome; giving the shard back "
                    "so they run again",
                    shard.batch_id,
                    shard.index,
                    missing,
                )
            end = (
                self._store.release_shard
                if self._stop.is_set() or missing
                else self._store.finish_shard
            )

            async def end_lease() -> None:
                if not await asyncio.to_thread(end, shard.batch_id, shard.index, self._token):
                    raise LeaseLost(f"lease on {shard.batch_id}/{shard.index} lost")

            await self._until_done("end of the lease", end_lease)
        except LeaseLost:
            log.warning("lost the lease on %s/%d; stopping", shard.batch_id, shard.index)
        finally:
            heartbeat.cancel()
            flusher.cancel()
            await asyncio.gather(heartbeat, flusher, return_exceptions=True)

    async def _dispatch_all(self, batch: BatchRecord, requests: AsyncIterator[Request]) -> set[int]:
        """Start requests lazily, at most `cap` at a time, so memory stays bounded by the
        window, not the shard; on stop, send nothing more and abort what is in flight after the
        grace period. Returns the line numbers started."""
        dispatcher = self._dispatchers.get(batch.model or "")
        cap = dispatcher.in_hand() if dispatcher is not None else 16
        # long prompts may wait behind short ones only in the first half of the window
        defer_until = batch.created_at + (batch.expires_at - batch.created_at) / 2
        slots = asyncio.Semaphore(cap)
        running: set[asyncio.Task[None]] = set()

        def finished(task: asyncio.Task[None]) -> None:
            running.discard(task)
            slots.release()

        async def abort_on_stop() -> None:
            await self._stop.wait()
            # Cancel/expiry/shutdown: requests not at the engine yet (waiting for a slot, a
            # long prompt deferred, a retry's backoff) never go; those at the engine may finish
            # within the grace period (their results are kept); a lost lease aborts everything
            # at once (nothing can be recorded).
            for task in list(running):
                if self._lost or dispatcher is None or not dispatcher.is_sending(task):
                    task.cancel()
            grace = self._settings.cancel_grace_seconds
            if running and not self._lost and grace > 0:
                await asyncio.wait(list(running), timeout=grace)
            for task in list(running):
                task.cancel()

        started: set[int] = set()
        watcher = asyncio.create_task(abort_on_stop())
        try:
            async for line_no, cid, body, group in requests:
                await slots.acquire()
                while not self._room.is_set() and not self._stop.is_set():
                    await _first(self._room.wait(), self._stop.wait())
                if self._stop.is_set():
                    slots.release()
                    break
                started.add(line_no)
                task = asyncio.create_task(
                    self._one(
                        dispatcher,
                        batch.endpoint,
                        line_no,
                        cid,
                        body,
                        defer_until=defer_until,
                        group=group,
                        scope=batch.project_id,
                    )
                )
                running.add(task)
                task.add_done_callback(finished)
            if running:
                await asyncio.gather(*list(running), return_exceptions=True)
        except BaseException as exc:
            # Reading the input failed part-way (or the run was cancelled): start nothing more,
            # and let the requests already started end first (a stop still aborts them, as
            # above), so nothing keeps running detached and `run` records their results before
            # the error goes on; the lines not read run on the next lease. A cancelled run
            # cancels them.
            if isinstance(exc, asyncio.CancelledError):
                for task in list(running):
                    task.cancel()
            if running:
                await asyncio.gather(*list(running), return_exceptions=True)
            raise
        finally:
            watcher.cancel()
        return started

    async def _load(self, batch: BatchRecord) -> AsyncIterator[Request]:
        """The shard's requests not yet recorded as done (the line numbers in its segments'
        record headers), read as they are needed: in planned order or in input order."""
        shard = self.shard
        done: set[int] = set()
        segments = await asyncio.to_thread(self._store.segments, shard.batch_id, shard.index)
        for seg in segments:
            async for place in index_records(self._blobs.stream(seg.blob_path)):
                done.add(place.line_no)
            self._seq = max(self._seq, seg.seq + 1)
        file = await asyncio.to_thread(self._store.get_file, batch.input_file_id)
        if file is None:
            return _no_requests()
        if self._settings.plan_prefixes:
            return self._planned(batch.endpoint, file.blob_path, done)
        return self._in_order(file.blob_path, done)

    async def _in_order(self, path: str, done: set[int]) -> AsyncIterator[Request]:
        shard = self.shard
        lines = iter_lines(self._ranges(path, shard.start, shard.end))
        async for line_no, cid, body in iter_requests(lines, shard.first_line):
            if line_no not in done:
                yield line_no, cid, body, None

    async def _planned(self, endpoint: str, path: str, done: set[int]) -> AsyncIterator[Request]:
        """Read the shard once for the keys (`domain/planning.py`), then the bodies again in
        key order, a dispatcher's `in_hand` at a time, with coalesced ranged reads."""
        shard = self.shard
        entries: list[Planned] = []
        lines = iter_lines(self._ranges(path, shard.start, shard.end))
        async for line_no, start, raw in numbered_spans(lines, shard.first_line, shard.start):
            if line_no in done:
                continue
            _, body = parse_request(raw)
            key = dispatch_key(endpoint, body, body_key(endpoint, body))
            entries.append(Planned(key, line_no, start, start + len(raw)))
        order = plan(entries)
        del entries
        dispatcher = self._dispatchers.get(self._model or "")
        size = dispatcher.in_hand() if dispatcher is not None else 16
        for piece in chunks(order, size):
            raws: dict[int, bytes] = {}
            for start, end, members in coalesce(piece):
                data = await self._blobs.get_range(path, start, end)
                for p in members:
                    raws[p.line_no] = data[p.start - start : p.end - start]
            for p in piece:
                cid, body = parse_request(raws.pop(p.line_no))
                yield p.line_no, cid, body, group_of(p.key)

    async def _ranges(self, path: str, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes [start, end) of the input, one ranged read per `INPUT_CHUNK` as the run needs
        them: a shard may run for hours, longer than a streamed read should stay open."""
        while start < end:
            stop = min(start + INPUT_CHUNK, end)
            yield await self._blobs.get_range(path, start, stop)
            start = stop

    async def _one(
        self,
        dispatcher: Dispatcher | None,
        endpoint: str,
        line_no: int,
        custom_id: str,
        body: dict[str, Any],
        *,
        defer_until: float,
        group: bytes | None = None,
        scope: str = "",
    ) -> None:
        done = await run_request(
            dispatcher,
            endpoint,
            custom_id,
            body,
            where=f"(line {line_no} of batch {self.shard.batch_id})",
            defer_until=defer_until,
            stopped=self._stop.is_set,
            group=group,
            scope=scope,
        )
        if done is not None:  # None: stopped before it reached the engine
            self._add(
                line_no, done.kind, done.line, done.usage, ok=done.ok, at_engine=done.engine_seconds
            )

    def _add(
        self,
        line_no: int,
        kind: ResultKind,
        line: bytes,
        usage: Usage,
        *,
        ok: bool,
        at_engine: float = 0.0,
    ) -> None:
        if line_no in self._accounted:  # never two outcomes for one line
            log.error("line %d of %s got a second outcome; kept the first", line_no, self.shard)
            return
        self._accounted.add(line_no)
        record = segment_record(line_no, kind, line)
        self._buffer.append(_Result(line_no, record, ok, usage, at_engine))
        self._buffered_bytes += len(record)
        if (
            len(self._buffer) >= self._settings.flush_every_requests
            or self._buffered_bytes >= FLUSH_BYTES
        ):
            self._flush_wanted.set()
        if len(self._buffer) >= self._max_buffered or self._buffered_bytes >= 4 * FLUSH_BYTES:
            self._room.clear()  # checkpoints are failing: start nothing new until they pass

    async def _flusher(self) -> None:
        interval = self._settings.flush_every_seconds
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush_wanted.wait(), interval)
            self._flush_wanted.clear()
            try:
                await self._flush_until_recorded()
            except LeaseLost:
                self._lost = True
                self._stop.set()
                return

    async def _flush_until_recorded(self) -> None:
        """Checkpoint; on failure keep the results and try again with backoff until it is
        recorded, or the lease is lost (`LeaseLost`: the next owner re-runs them)."""
        await self._until_done("checkpoint (results kept)", self._flush)

    async def _record_all(self) -> None:
        """Checkpoint until every buffered result is recorded (or the lease is lost)."""
        while self._pending is not None or self._buffer:
            await self._flush_until_recorded()

    def _cut(self) -> _Pending:
        """Move the buffer into a new pending segment."""
        results, self._buffer = self._buffer, []
        self._buffered_bytes = 0
        self._room.set()
        usage = Usage()
        completed = 0
        engine_seconds = 0.0
        for r in results:
            completed += r.ok
            engine_seconds += r.engine_seconds
            if r.usage.input_tokens or r.usage.output_tokens:
                usage = usage + r.usage
        shard = self.shard
        pending = _Pending(
            seq=self._seq,
            path=paths.segment_path(shard.batch_id, shard.index, self._seq, self._token),
            data=b"".join(r.record for r in results),
            completed=completed,
            failed=len(results) - completed,
            usage=usage,
            engine_ms=round(engine_seconds * 1000),
            # priced once, when cut: a retried checkpoint records the same entry
            cost=self._prices.cost(self._model, usage, batch=True),
            at=int(self._clock()),
        )
        self._seq += 1
        return pending

    async def _flush(self) -> None:
        """Record the pending segment (cut one from the buffer if there is none)."""
        async with self._flush_lock:
            if self._lost:
                raise LeaseLost("lease lost")
            if self._pending is None:
                if not self._buffer:
                    return
                self._pending = self._cut()
            pending = self._pending
            shard = self.shard
            await self._blobs.put(pending.path, pending.data)
            segment = Segment(
                batch_id=shard.batch_id,
                shard_index=shard.index,
                seq=pending.seq,
                blob_path=pending.path,
                completed=pending.completed,
                failed=pending.failed,
                usage=pending.usage,
                owner=self._owner,
                engine_ms=pending.engine_ms,
                cost=pending.cost,
                at=pending.at,
            )
            ok = await asyncio.to_thread(self._store.record_segment, segment, self._token)
            if not ok:
                self._lost = True
                await self._blobs.delete(pending.path)
                raise LeaseLost(f"lease on {shard.batch_id}/{shard.index} lost")
            self._pending = None

    async def _until_done(self, what: str, attempt: Callable[[], Awaitable[None]]) -> None:
        """Run `attempt` until it succeeds, with backoff while the store or the blob store
        fails (locked, refused, disk full); `LeaseLost` ends it. The first failure of an
        episode is logged, the recovery once with the count of failed attempts. Any other
        exception is a bug: logged with its traceback and raised, so the run ends and the
        lease runs out (the next owner re-runs what was not recorded) instead of retrying
        forever."""
        delay = 0.1
        failures = 0
        shard = self.shard
        while True:
            try:
                await attempt()
            except LeaseLost:
                raise
            except Exception as exc:
                if outage_of(exc) is None:
                    log.exception("%s/%d: %s failed", shard.batch_id, shard.index, what)
                    raise
                failures += 1
                if failures == 1:
                    log.warning(
                        "%s/%d: %s failed (%s: %s); retrying with backoff",
                        shard.batch_id,
                        shard.index,
                        what,
                        type(exc).__name__,
                        exc,
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_FLUSH_BACKOFF, self._settings.lease_seconds / 4)
                continue
            if failures:
                log.warning(
                    "%s/%d: %s succeeded after %d failed attempts",
                    shard.batch_id,
                    shard.index,
                    what,
                    failures,
                )
            return

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
            try:
                if now - last_renew >= lease / 3:
                    ok = await asyncio.to_thread(
                        self._store.renew_lease,
                        shard.batch_id,
                        shard.index,
                        self._token,
                        now,
                        lease,
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
            except Exception as exc:
                # the store is failing: keep trying; if the lease runs out meanwhile, the
                # fenced writes will say so. Anything else is a bug: shown, and tried again.
                if outage_of(exc) is None:
                    log.exception("heartbeat of %s/%d failed", shard.batch_id, shard.index)
                else:
                    log.debug("heartbeat of %s/%d failed: %s", shard.batch_id, shard.index, exc)


async def _first(*aws: Any) -> None:
    """Wait until the first of these awaitables is done; cancel the rest."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


async def _no_requests() -> AsyncIterator[Request]:
    return
    yield  # an async generator that yields nothing
