"""The composition root: the only place that picks concrete backends and wires the parts.

`Service` opens the store (and migrates it), the blob store and the engines, and runs the
background duties (scheduler, worker) inside the API server's lifespan, or on their own for
`backfill worker`.

API keys given at start (`--api-key`, the config file, `BACKFILL_API_KEYS`) are valid only
while given: when an API app is built (`backfill serve`), they are registered as `flag` keys
and the flag keys an earlier start was given but this one is not are revoked (stored, rather
than checked in memory, so `backfill keys list` shows every key that works and the auth path
stays one store lookup). Every API process sharing a database should therefore be given the
same keys. Workers and the `keys` commands leave flag keys alone.

With no model configured at all (no `--model`, none in the config file) and `backfill[local]`
installed, it serves the default models (`engines/registry.default_models`): the packaged
all-MiniLM-L6-v2 as `all-MiniLM-L6-v2` for embeddings and SmolLM2-135M-Instruct for chat and
completions (fetched and converted once into a cache: `engines/smollm2.py`), so the quick start
needs no inference server. `BACKFILL_DEFAULT_MODEL=false` turns both off,
`BACKFILL_DEFAULT_CHAT_MODEL=false` the chat model alone.

Webhook endpoints from the config file's `[[webhooks]]` are synced the same way (by the API
process only), and every process that runs the scheduler also runs a webhook `Deliverer`
over the store's outbox (`webhooks/deliverer.py`).

Real time and batch share each model's engine. Per model, one `RealtimeStats` is written by the
real-time gateway (its streams' TTFT and TPOT included) and read by the
model's `Governor`, which moves the batch dispatcher's limit. A governor runs (with the worker)
for every model unless `governor = false` (those keep their fixed `max_concurrency`). On an
upstream without metrics it stays dormant, the batch at `max_concurrency`, until the first
real-time request passes the gateway, so a batch alone runs as it would without a governor.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import statistics
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from backfill.blobs import open_blobs
from backfill.blobs.base import Blobs
from backfill.dispatch.dispatcher import Dispatcher
from backfill.dispatch.governor import Governor, make_policy
from backfill.dispatch.signals import RealtimeStats
from backfill.domain.validation import TokenCounter
from backfill.engines.base import Engine, ReplicaReporting, TokenCounting
from backfill.engines.registry import build_engine, build_engines, with_default_models
from backfill.metrics import Family, Kind
from backfill.scheduler.scheduler import Scheduler
from backfill.settings import ModelConfig, Settings
from backfill.store import open_store
from backfill.store.base import Store
from backfill.worker.worker import Worker

if TYPE_CHECKING:
    from backfill.api.context import Latency, ModelLoad

log = logging.getLogger("backfill")

#: the newest real-time latency samples per model the dashboard summarizes
RECENT_LATENCIES = 256

DEFAULT_PROJECT = "default"


def batch_dispatcher(engine: Engine, config: ModelConfig, settings: Settings) -> Dispatcher:
    """The dispatcher that runs one model's batch requests: the server's and `backfill run`'s
    alike (batch `priority` where the upstream accepts it)."""
    return Dispatcher.from_config(engine, config, priority=settings.batch_priority)


async def start_offline_model(settings: Settings, config: ModelConfig) -> Dispatcher:
    """`backfill run`'s one model: its engine started and its batch dispatcher, without the
    store, blobs or background duties a server has. Close with `dispatcher.engine.close()`."""
    engine = build_engine(config)
    await engine.start()
    return batch_dispatcher(engine, config, settings)


def token_counters(engines: Mapping[str, Engine]) -> dict[str, TokenCounter]:
    """The prompt-token counters of the engines that have a tokenizer (in-process ones); the
    scheduler estimates the tokens of the others' requests."""
    return {
        name: engine.count_tokens
        for name, engine in engines.items()
        if isinstance(engine, TokenCounting)
    }


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_prefix(key: str) -> str:
    """What `backfill keys list` shows of a key: enough for its owner to recognize it, too
    little to guess it (`sk-bf-` and two random characters of a generated key; only three
    characters of a short hand-picked one)."""
    return key[:8] if len(key) >= 32 else key[:3]


class WatchedRealtimeStats(RealtimeStats):
    """`RealtimeStats` that also keeps the newest samples its reader drained, so the dashboard
    shows the gateway's TTFT and TPOT without taking them from the governor."""

    def __init__(self) -> None:
        super().__init__()
        self.recent_ttft: deque[float] = deque(maxlen=RECENT_LATENCIES)
        self.recent_tpot: deque[float] = deque(maxlen=RECENT_LATENCIES)

    def drain_tpots(self) -> list[float]:
        tpot = super().drain_tpots()
        self.recent_tpot.extend(tpot)
        return tpot

    def drain_ttfts(self) -> list[float]:
        ttft = super().drain_ttfts()
        self.recent_ttft.extend(ttft)
        return ttft


def _latency(samples: Iterable[float]) -> Latency | None:
    from backfill.api.context import Latency

    ordered = sorted(samples)
    if not ordered:
        return None
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return Latency(statistics.median(ordered), p90, len(ordered))


class Service:
    def __init__(self, settings: Settings) -> None:
        settings = with_default_models(settings)
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.store: Store = open_store(
            settings.database_url, busy_timeout=settings.store_busy_timeout
        )
        self.store.migrate()
        self.blobs: Blobs = open_blobs(settings.storage, settings.data_dir)
        self.engines: dict[str, Engine] = build_engines(settings.models)
        self.dispatchers: dict[str, Dispatcher] = {}
        self.governors: dict[str, Governor] = {}
        self.realtime_stats: dict[str, WatchedRealtimeStats] = {
            m.name: WatchedRealtimeStats() for m in settings.models
        }
        self.served: dict[str, frozenset[str]] = {
            m.name: frozenset(m.endpoints) for m in settings.models
        }

    def add_key(
        self, key: str, project_name: str, *, source: str = "cli", admin: bool = False
    ) -> None:
        """Register `key` for the project (made if new); an `admin` key also reads every
        project's usage and costs (`/v1/organization/...`, `backfill usage`)."""
        project = self.store.ensure_project(project_name)
        self.store.add_api_key(
            project.id,
            hash_key(key),
            int(time.time()),
            prefix=key_prefix(key),
            source=source,
            admin=admin,
        )

    def sync_configured_keys(self) -> None:
        """Keys given at serve start (`--api-key`, the config file, `BACKFILL_API_KEYS`) are
        `flag` keys of project `default`, valid only while given: register these, revoke the
        flag keys an earlier start was given and this one is not."""
        keys = list(dict.fromkeys(self.settings.api_keys))
        for key in keys:
            self.add_key(key, DEFAULT_PROJECT, source="flag")
        gone = self.store.revoke_flag_keys({hash_key(k) for k in keys}, int(time.time()))
        for old in gone:
            log.info("revoked API key %s (%s...): no longer given at start", old.id, old.prefix)

    def sync_configured_webhooks(self) -> None:
        """The config file's `[[webhooks]]` are kept in the store while listed, like the keys
        given at start: by the API process only, so a worker started with another config
        leaves them alone (`webhooks/endpoints.py`)."""
        from backfill.webhooks.endpoints import sync_config_endpoints

        sync_config_endpoints(self.store, list(self.settings.webhooks), int(time.time()))

    async def start_engines(self) -> None:
        settings = self.settings
        for config in settings.models:
            engine = self.engines[config.name]
            await engine.start()
            dispatcher = batch_dispatcher(engine, config, settings)
            self.dispatchers[config.name] = dispatcher
            # on unless turned off: dormant without engine metrics until real time comes
            if config.governor is not False and settings.run_worker:
                self.governors[config.name] = Governor(
                    dispatcher,
                    self.realtime_stats[config.name],
                    make_policy(settings, config),
                    interval=settings.governor_interval,
                    peaks=self.store,  # the reference peak across restarts
                )
                log.info("governor on for model %s", config.name)

    async def close_engines(self) -> None:
        for engine in self.engines.values():
            with contextlib.suppress(Exception):
                await engine.close()

    @contextlib.asynccontextmanager
    async def background(self) -> AsyncIterator[None]:
        """Run the scheduler and the worker (as the settings say) until the block exits."""
        await self.start_engines()
        stop = asyncio.Event()
        tasks: list[asyncio.Task[None]] = []
        if self.settings.run_scheduler:
            scheduler = Scheduler(
                self.settings,
                self.store,
                self.blobs,
                self.served,
                token_counters=token_counters(self.engines),
            )
            tasks.append(asyncio.create_task(scheduler.run(stop)))
        if self.settings.run_worker:
            worker = Worker(self.settings, self.store, self.blobs, self.dispatchers)
            tasks.append(asyncio.create_task(worker.run(stop)))
        for governor in self.governors.values():
            tasks.append(asyncio.create_task(governor.run(stop)))
        if self.settings.run_scheduler:
            from backfill.webhooks.deliverer import Deliverer

            tasks.append(asyncio.create_task(Deliverer(self.settings, self.store).run(stop)))
        try:
            yield
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.close_engines()

    def metric_families(self) -> list[Family]:
        """Per-model figures for `GET /metrics`, read at every scrape (`backfill.metrics`)."""
        d, r = self.dispatchers, self.realtime_stats
        g = {name: gov.history[-1][1] for name, gov in self.governors.items() if gov.history}
        gc = {name: x for name, x in g.items() if x.ttft_cap is not None}
        # what each governor last read from its engine (no series while unknown)
        e = {name: gov.engine_load for name, gov in self.governors.items() if gov.engine_load}
        ew = {
            name: x for name, x in e.items() if "waiting" not in self.governors[name].engine_missing
        }
        ek = {
            name: x
            for name, x in e.items()
            if "kv_usage" not in self.governors[name].engine_missing
        }
        on = {name: gov.engine_load is not None for name, gov in self.governors.items()}
        rows: list[tuple[str, Kind, str, Callable[[Any], float], dict[str, Any]]] = [
            ("batch_limit", "gauge", "batch requests allowed at once", lambda x: x.limit, d),
            ("batch_in_flight", "gauge", "batch at the engine", lambda x: x.stats.in_flight, d),
            ("batch_sent_total", "counter", "batch attempts sent", lambda x: x.stats.sent, d),
            ("batch_retried_total", "counter", "batch attempts that were retries",
             lambda x: x.stats.retried, d),
            ("batch_succeeded_total", "counter", "batch requests answered 2xx",
             lambda x: x.stats.succeeded, d),
            ("batch_failed_total", "counter", "batch requests that ended in an error",
             lambda x: x.stats.failed, d),
            ("batch_transport_errors_total", "counter", "batch attempts that reached no answer",
             lambda x: x.stats.transport_errors, d),
            ("batch_bad_bodies_total", "counter", "batch 2xx answers not a JSON object",
             lambda x: x.stats.bad_bodies, d),
            ("batch_shed_total", "counter", "batch attempts shed", lambda x: x.stats.shed, d),
            ("batch_throttled_total", "counter", "batch 429/503", lambda x: x.stats.throttled, d),
            ("batch_deferred", "gauge", "long prompts waiting", lambda x: x.stats.deferred, d),
            ("batch_requests_total", "counter", "batch requests asked (input lines)",
             lambda x: x.stats.requests, d),
            ("batch_shared_total", "counter",
             "batch requests answered by an identical request's call (not sent)",
             lambda x: x.stats.shared, d),
            ("batch_held_total", "counter",
             "batch requests that waited for their cold prefix group's first request",
             lambda x: x.stats.held, d),
            ("realtime_in_flight", "gauge", "real time at the engine", lambda x: x.in_flight, r),
            ("realtime_requests_total", "counter", "real-time requests", lambda x: x.arrivals, r),
            ("governor_reference", "gauge", "real-time peak planned for", lambda x: x.reference, g),
            ("governor_knee", "gauge", "sequences doubling the step time", lambda x: x.knee, g),
            ("governor_trim", "gauge", "model correction (0.25..1)", lambda x: x.trim, g),
            ("governor_idle", "gauge", "1: no real time, at the ceiling", lambda x: x.idle, g),
            ("governor_dormant", "gauge",
             "1: no engine metrics and no real-time request yet: at the ceiling, not governing",
             lambda x: x.dormant, g),
            ("governor_ttft_cap", "gauge",
             "batch level real-time TTFT allows (no engine metrics; absent: not watched)",
             lambda x: x.ttft_cap, gc),
            ("governor_engine_metrics", "gauge",
             "1: governing on the engine's metrics, 0: on the gateway's latencies alone",
             lambda x: x, on),
            ("engine_requests_running", "gauge", "running at the engine, as last read",
             lambda x: x.running, e),
            ("engine_requests_waiting", "gauge", "queued at the engine, as last read",
             lambda x: x.waiting, ew),
            ("engine_kv_cache_usage", "gauge", "engine KV-cache usage (0..1), as last read",
             lambda x: x.kv_usage, ek),
        ]  # fmt: skip
        families = [
            Family(f"backfill_{name}", kind, text, {m: float(get(x)) for m, x in source.items()})
            for name, kind, text, get, source in rows
        ]
        return families + self.replica_families()

    def replica_families(self) -> list[Family]:
        """Per model and replica (models with several `urls`; `replica` is its URL): the
        router's figures (`engines/routing.ReplicaState`), so an operator sees how the load and
        the failures are spread, which the per-model figures (summed over replicas) hide."""
        stats: dict[tuple[str, ...], dict[str, Any]] = {
            (model, replica["url"]): replica
            for model, engine in self.engines.items()
            if isinstance(engine, ReplicaReporting)
            for replica in engine.replica_stats()
        }
        rows: list[tuple[str, Kind, str]] = [  # (name: its `replica_stats` field, less _total)
            ("in_flight", "gauge",
             "requests backfill has at the replica now (batch and real time)"),
            ("external", "gauge",
             "requests the replica's own metrics say it runs or queues beyond backfill's "
             "(other clients and backfill processes), as last scraped"),
            ("sent_total", "counter", "attempts sent to the replica (batch and real time)"),
            ("errors_total", "counter",
             "attempts at the replica that got no answer or an answer >= 500"),
            ("spilled_total", "counter",
             "requests of prefix groups mapped to the replica sent to another because it was "
             "much busier (affinity routing)"),
            ("drained", "gauge", "1: drained (failing; no new request until a probe answers)"),
        ]  # fmt: skip
        return [
            Family(
                f"backfill_replica_{name}",
                kind,
                text,
                {
                    key: float(replica[name.removesuffix("_total")])
                    for key, replica in stats.items()
                },
                ("model", "replica"),
            )
            for name, kind, text in rows
        ]

    def model_loads(self) -> list[ModelLoad]:
        """Each model's batch and real-time load for the dashboard (`api/dashboard.py`)."""
        from backfill.api.context import ModelLoad

        loads = []
        for name, dispatcher in self.dispatchers.items():
            stats = self.realtime_stats[name]
            governor = self.governors.get(name)
            state, reference = "off", None
            if governor is None:
                stats.drain_ttfts()  # no governor reads them: keep the newest for the view
                stats.drain_tpots()
            elif governor.history:
                decision = governor.history[-1][1]
                reference = decision.reference
                state = "dormant" if decision.dormant else "idle" if decision.idle else "reference"
            else:
                state = "starting"
            loads.append(
                ModelLoad(
                    name=name,
                    batch_limit=dispatcher.limit,
                    batch_in_flight=dispatcher.stats.in_flight,
                    batch_deferred=dispatcher.stats.deferred,
                    realtime_in_flight=stats.in_flight,
                    realtime_requests=stats.arrivals,
                    ttft=_latency(stats.recent_ttft),
                    tpot=_latency(stats.recent_tpot),
                    governor=state,
                    reference=reference,
                    engine_metrics=governor is not None and governor.engine_load is not None,
                )
            )
        return loads

    def api_app(self) -> Any:
        from backfill.api.app import create_app
        from backfill.api.context import ApiContext, RealtimeModel

        self.sync_configured_keys()
        self.sync_configured_webhooks()

        realtime = {
            m.name: RealtimeModel(
                m.name,
                self.engines[m.name],
                m.priority,
                self.realtime_stats[m.name],
            )
            for m in self.settings.models
        }
        ctx = ApiContext(
            settings=self.settings,
            store=self.store,
            blobs=self.blobs,
            models=self.served,
            realtime=realtime,
            metrics=self.metric_families,
            model_loads=self.model_loads,
        )

        @contextlib.asynccontextmanager
        async def lifespan(app: Any) -> AsyncIterator[None]:
            try:
                async with self.background():
                    yield
            finally:
                # real-time usage entries still being written land before the store closes
                if ctx.realtime_ledger is not None:
                    await ctx.realtime_ledger.drain()
                # Here rather than after uvicorn returns: uvicorn re-raises SIGTERM after a
                # graceful shutdown, so code after `Server.run()` may never run.
                self.close()

        return create_app(ctx, lifespan=lifespan)

    def close(self) -> None:
        self.store.close()
