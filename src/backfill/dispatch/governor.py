"""`Governor`: the I/O around `GovernorPolicy` for one model.

Every `interval` (100 ms by default) it gathers the signals - the upstream's vLLM metrics
(`engine.load_metrics()`: running, waiting, KV usage, and the TPOT histogram's sum and count,
whose deltas give the mean inter-token latency since the last scrape), the gateway's
`RealtimeStats` (real-time requests in flight, arrivals, streamed TTFT/TPOT) and the
dispatcher's counters (batch requests in flight, 429/503 answers) - asks the policy, and hands
the decision to the dispatcher in one call, `dispatcher.apply(decision)` (limit, pacing,
deferral, shedding). All the thinking is in `policy.py`; this module only measures and acts.

An upstream without metrics still works: the policy then learns from the gateway's latencies
and the dispatcher's errors alone. A scrape that fails counts as "no metrics" for that tick.

The last decisions are kept in `history` (time, decision) for logs, tests and benches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable

from backfill.dispatch.dispatcher import Dispatcher
from backfill.dispatch.policy import Decision, GovernorPolicy, PolicyConfig
from backfill.dispatch.signals import EngineLoad, RealtimeStats, Signals
from backfill.engines.base import Engine, MetricsSource
from backfill.settings import ModelConfig, Settings

log = logging.getLogger("backfill.governor")

_TPOT = ("vllm:time_per_output_token_seconds", "vllm:inter_token_latency_seconds")
_KV = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


def policy_config(settings: Settings, config: ModelConfig) -> PolicyConfig:
    return PolicyConfig(
        ceiling=config.max_concurrency,
        floor=max(1, min(settings.governor_min_limit, config.max_concurrency)),
        ttft_inflation=settings.governor_ttft_inflation,
        tpot_inflation=settings.governor_tpot_inflation,
        window=settings.governor_window_seconds,
        idle_after=settings.governor_idle_seconds,
        abort=settings.governor_abort,
        defer_over=settings.governor_defer_prompt_tokens or None,
    )


class Governor:
    def __init__(
        self,
        dispatcher: Dispatcher,
        stats: RealtimeStats,
        policy: GovernorPolicy,
        *,
        interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dispatcher = dispatcher
        self.engine: Engine = dispatcher.engine
        self.stats = stats
        self.policy = policy
        self.interval = interval
        self.history: deque[tuple[float, Decision]] = deque(maxlen=100_000)
        self._clock = clock
        self._arrivals = stats.arrivals
        self._throttled = dispatcher.stats.throttled
        self._tpot_sum: float | None = None
        self._tpot_count: float | None = None

    async def load(self) -> EngineLoad | None:
        engine = self.engine
        if not isinstance(engine, MetricsSource):
            return None
        metrics = await engine.load_metrics()
        if not metrics or "vllm:num_requests_running" not in metrics:
            return None
        tpot: float | None = None
        for name in _TPOT:
            total = metrics.get(name + "_sum")
            count = metrics.get(name + "_count")
            if total is None or count is None:
                continue
            if self._tpot_count is not None and self._tpot_sum is not None:
                tokens = count - self._tpot_count
                if tokens > 0:
                    tpot = (total - self._tpot_sum) / tokens
            self._tpot_sum, self._tpot_count = total, count
            break
        kv = next((metrics[n] for n in _KV if n in metrics), 0.0)
        return EngineLoad(
            running=metrics["vllm:num_requests_running"],
            waiting=metrics.get("vllm:num_requests_waiting", 0.0),
            kv_usage=kv,
            tpot=tpot,
        )

    async def tick(self) -> Decision:
        engine_load = await self.load()
        stats = self.stats
        dstats = self.dispatcher.stats
        tpot = stats.drain_tpots()
        signals = Signals(
            now=self._clock(),
            rt_in_flight=stats.in_flight,
            rt_arrivals=stats.arrivals - self._arrivals,
            batch_in_flight=dstats.in_flight,
            batch_throttled=dstats.throttled - self._throttled,
            rt_tpot=tuple(tpot),
            engine=engine_load,
        )
        self._arrivals = stats.arrivals
        self._throttled = dstats.throttled
        decision = self.policy.decide(signals)
        self.dispatcher.apply(decision)
        self.history.append((signals.now, decision))
        return decision

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = self._clock()
            try:
                await self.tick()
            except Exception:
                log.exception("governor tick failed for %s", self.engine.model)
            delay = max(0.0, self.interval - (self._clock() - started))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
