"""The worker loop: keep shards running while the models can take more, leasing as they end.

How many shards run at once follows the models' capacity, not a fixed number:

- Up to `worker_shards` (4) shards run whatever the models' room. One large shard alone keeps
  its model's window full (it keeps `in_hand()` requests started), so for large batches this
  is what it always was: several shards, so the window stays full while one drains its last
  slow requests, and batches of one model share the window fairly between projects.
- Beyond that, the worker leases more while some model's dispatcher has room its running
  shards do not fill (`_Capacity`): its `limit` minus the requests it holds (`in_flight`,
  `waiting` for a slot, `deferred`), minus what shards leased moments ago will start and do
  not show there yet. Only batches of models with room are leased (`lease_shard`'s
  `skip_models` names the full ones; the store's order across batches, fair between projects,
  applies among the rest). Sixteen one-request batches of 3 s requests then run at once, not
  four at a time.
- At most `worker_max_shards` (256) shards run at once. Memory stays bounded: each `ShardRun`
  keeps at most `in_hand()` requests started and at most `_max_buffered` results (or
  4 x `FLUSH_BYTES`) waiting for a checkpoint, and shards beyond the floor are leased only for
  requests the windows can take now.

A leased shard's batch is read once, here, and handed to its `ShardRun`. If that read fails
(or finds the batch gone), the lease is given back at once and leasing backs off as after any
store failure: a shard leased by no running shard would otherwise wait out its lease.

Leasing polls the store; an idle worker backs off to the poll interval. While the store or the
blobs fail, leasing backs off further (`backfill.outages`) and the failures are logged once per
episode, not once per attempt.

The projects' fair-share weights are read from the store at most every
`project_settings_ttl` seconds (`domain/ordering.merged_weights`: a project's own weight wins
over `Settings.project_weights`), so `backfill projects set --weight` applies without a
restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from backfill.blobs.base import Blobs
from backfill.dispatch.dispatcher import Dispatcher
from backfill.domain.ids import new_token
from backfill.domain.ordering import merged_weights
from backfill.domain.records import Shard
from backfill.outages import Outages
from backfill.settings import Settings
from backfill.store.base import Store
from backfill.worker.capacity import RunningShard, full_models
from backfill.worker.shard_run import ShardRun

log = logging.getLogger("backfill.worker")


class Worker:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        blobs: Blobs,
        dispatchers: dict[str, Dispatcher],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.id = "worker-" + new_token()[:12]
        self._settings = settings
        self._store = store
        self._blobs = blobs
        self._dispatchers = dispatchers
        self._clock = clock
        self._runs: dict[asyncio.Task[None], ShardRun] = {}
        #: what each run may ask of its model (`worker/capacity.py`)
        self._running: dict[asyncio.Task[None], RunningShard] = {}
        #: the most shards this worker has run at once (for tests and benchmarks)
        self.peak_shards = 0
        self._weights: dict[str, float] = dict(settings.project_weights)
        self._weights_until = float("-inf")
        self._outages = Outages(
            log,
            base=settings.scheduler_interval,
            cap=settings.outage_backoff_max,
            slack=settings.store_busy_timeout,
            clock=clock,
        )

    async def run(self, stop: asyncio.Event) -> None:
        poll = self._settings.scheduler_interval
        while not stop.is_set():
            leased = backing_off = False
            skip = self._skip_models()
            if skip is not None:
                try:
                    leased = await self._lease_one(skip)
                    self._outages.succeeded()
                except Exception as exc:
                    if not self._outages.failed(exc):
                        log.exception("leasing failed")
                    backing_off = True
            if leased:
                continue
            stopper = asyncio.ensure_future(stop.wait())
            waiters: set[asyncio.Future[Any]] = {stopper}
            if not backing_off:  # a shard that ends makes room for the next one
                waiters.update(self._runs)
            wait = self._outages.delay if backing_off else poll
            await asyncio.wait(waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
        for shard_run in self._runs.values():
            shard_run.stop()
        await asyncio.gather(*self._runs, return_exceptions=True)

    def _skip_models(self) -> frozenset[str] | None:
        """The models to skip when leasing now, or None when no shard should be leased: under
        `worker_shards` shards nothing is skipped; beyond it, up to `worker_max_shards`, only
        models with room are leased, and nothing while every model is full."""
        settings = self._settings
        running = len(self._runs)
        if running >= settings.worker_max_shards:
            return None
        if running < settings.worker_shards:
            return frozenset()
        loads = {
            model: (d.limit, d.in_flight + d.waiting + d.stats.deferred)
            for model, d in self._dispatchers.items()
        }
        full, some_room = full_models(loads, self._running.values(), time.monotonic())
        return full if some_room else None

    async def _lease_one(self, skip: frozenset[str]) -> bool:
        token = new_token()
        shard = await asyncio.to_thread(
            self._store.lease_shard,
            self.id,
            token,
            self._clock(),
            self._settings.lease_seconds,
            await self.weights() or None,
            skip or None,
        )
        if shard is None:
            return False
        try:
            batch = await asyncio.to_thread(self._store.get_batch, shard.batch_id)
        except Exception:
            await self._give_back(shard, token)
            raise
        if batch is None:  # deleted since it was leased
            await self._give_back(shard, token)
            return False
        model = batch.model
        dispatcher = self._dispatchers.get(model or "")
        demand = min(shard.count - shard.done, dispatcher.in_hand()) if dispatcher else 0
        shard_run = ShardRun(
            settings=self._settings,
            store=self._store,
            blobs=self._blobs,
            dispatchers=self._dispatchers,
            shard=shard,
            batch=batch,
            token=token,
            owner=self.id,
            clock=self._clock,
        )
        task = asyncio.create_task(self._guard(shard_run))
        self._runs[task] = shard_run
        self._running[task] = RunningShard(model, max(demand, 0), time.monotonic())
        task.add_done_callback(self._ended)
        self.peak_shards = max(self.peak_shards, len(self._runs))
        return True

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._runs.pop(task, None)
        self._running.pop(task, None)

    async def _give_back(self, shard: Shard, token: str) -> None:
        """Release a lease no run will use (best effort: if the store fails now too, the lease
        expires as it would have)."""
        try:
            await asyncio.to_thread(self._store.release_shard, shard.batch_id, shard.index, token)
        except Exception as exc:
            log.debug("could not give back %s/%d: %s", shard.batch_id, shard.index, exc)

    async def weights(self) -> Mapping[str, float]:
        """The projects' weights by name, re-read from the store when older than the TTL."""
        now = self._clock()
        if now >= self._weights_until:
            self._weights_until = now + self._settings.project_settings_ttl
            projects = await asyncio.to_thread(self._store.projects)
            self._weights = merged_weights(
                self._settings.project_weights, ((p.name, s.weight) for p, s in projects)
            )
        return self._weights

    async def _guard(self, shard_run: ShardRun) -> None:
        try:
            await shard_run.run()
        except Exception as exc:
            shard = shard_run.shard
            if not self._outages.failed(exc):
                log.exception(
                    "shard %s/%d failed; it will be resumed after its lease expires",
                    shard.batch_id,
                    shard.index,
                )
                return
            log.info(
                "shard %s/%d stopped (%s: %s); it will be resumed after its lease expires",
                shard.batch_id,
                shard.index,
                type(exc).__name__,
                exc,
            )
