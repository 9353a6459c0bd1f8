"""The worker loop: keep up to `worker_shards` shards running, leasing more as they finish.

Several shards run at once so the per-model concurrency window stays full while one shard
drains its last slow requests. Leasing polls the store; an idle worker backs off to the poll
interval. While the store or the blobs fail, leasing backs off further (`backfill.outages`)
and the failures are logged once per episode, not once per attempt.

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
from backfill.outages import Outages
from backfill.settings import Settings
from backfill.store.base import Store
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
            if len(self._runs) < self._settings.worker_shards:
                try:
                    leased = await self._lease_one()
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

    async def _lease_one(self) -> bool:
        token = new_token()
        shard = await asyncio.to_thread(
            self._store.lease_shard,
            self.id,
            token,
            self._clock(),
            self._settings.lease_seconds,
            await self.weights() or None,
        )
        if shard is None:
            return False
        shard_run = ShardRun(
            settings=self._settings,
            store=self._store,
            blobs=self._blobs,
            dispatchers=self._dispatchers,
            shard=shard,
            token=token,
            owner=self.id,
            clock=self._clock,
        )
        task = asyncio.create_task(self._guard(shard_run))
        self._runs[task] = shard_run
        task.add_done_callback(lambda t: self._runs.pop(t, None))
        return True

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
