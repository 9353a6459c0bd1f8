"""`Governor`: the I/O around `GovernorPolicy` for one model.

Every `interval` (100 ms by default) it gathers the signals - the upstream's metrics
(`engine.load_metrics()`: running, waiting, KV usage, and the TPOT histogram's sum and count,
whose deltas give the mean inter-token latency since the last scrape, under vLLM's, SGLang's
or llama.cpp's names, `backfill.metrics.RUNNING` etc., first found wins), the gateway's
`RealtimeStats` (real-time requests in flight, arrivals, streamed TTFT/TPOT) and the
dispatcher's counters (batch requests in flight, 429/503 answers) - asks the policy, and hands
the decision to the dispatcher in one call, `dispatcher.apply(decision)` (limit, pacing,
deferral, shedding). All the thinking is in `policy.py`; this module only measures and acts.

An upstream without metrics still works: the policy then learns from the gateway's latencies
(TPOT and TTFT) and the dispatcher's errors alone, and stays dormant (the ceiling) until the
first real-time request passes the gateway. A scrape that fails, or a page without a running
count under a known name, counts as "no metrics" for that tick, and the next scrapes back off:
after n such ticks in a row the next scrape waits `interval` x 2^(n-1), at most `RESCRAPE_SECONDS`
(60 s) for an upstream that never served metrics (llama-cpp-python's `/metrics` is a 404; the
engine itself asks again only every 30 s after a non-200, but a page without a known running
count, TGI's say, would otherwise be fetched and parsed 10 times a second for nothing), and at
most `RESCRAPE_AFTER_METRICS` (5 s) for one that did (a vLLM whose scrape timed out is read
again soon). A scrape missed within `HOLD_READING_SECONDS` (2 s) of the last good one keeps that
reading (without TPOT): a vLLM too busy to answer one scrape in time is not a switch to the
gateway's latencies and back (on a starved 2-core machine that flipped the source, and its log
line, every few seconds). `engine_load` keeps the last tick's `EngineLoad` (None: no engine
metrics), for `/metrics`; a change between the two is logged, once per change, and so is the
policy waking from dormancy.

The last decisions are kept in `history` (time, decision) for logs, tests and benches.

The planned real-time peak (the policy's `reference`: the highest of a high quantile of the
real-time load over each window of the last `day`) is kept across restarts when the governor
has a store (`peaks`): `run` first reads the model's saved peak and seeds the policy with it
(`GovernorPolicy.seed_reference`, as if watched when it was), then saves the day's peak every
`PEAK_SAVE_SECONDS` (30 s) when it is above 0, with the wall time it was seen at (not the time
of the save, so a peak carried over restarts still ages out). A peak seen more than a `day`
ago (24 h by default) is not used: a day-old one belongs to a traffic pattern (a deployment, a
model version, a user base) that may have changed since, and any model with real time in the
last day has a fresher one. Store errors are logged and skipped: the peak is a head start, not
something the governor waits for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from backfill.dispatch.aimd import AimdConfig, AimdPolicy
from backfill.dispatch.dispatcher import Dispatcher
from backfill.dispatch.policy import Decision, GovernorPolicy, PolicyConfig
from backfill.dispatch.signals import EngineLoad, RealtimeStats, Signals
from backfill.engines.base import Engine, MetricsSource
from backfill.metrics import KV_USAGE, RUNNING, TPOT, WAITING, first_of
from backfill.settings import ModelConfig, Settings
from backfill.store.base import GovernorPeak

log = logging.getLogger("backfill.governor")

#: longest pause between two scrapes of an upstream that never served metrics (seconds)
RESCRAPE_SECONDS = 60.0
#: longest pause between two scrapes of an upstream that served metrics before (seconds)
RESCRAPE_AFTER_METRICS = 5.0
#: a missed scrape within this many seconds of the last good one keeps that reading (its
#: running/waiting/KV; no TPOT): one slow or failed scrape is not a switch of signal source
HOLD_READING_SECONDS = 2.0
#: seconds between two saves of the reference peak (wall clock)
PEAK_SAVE_SECONDS = 30.0


class PeakStore(Protocol):
    """What the governor needs of the store (`store.base.Store` has it)."""

    def save_governor_peak(self, model: str, reference: float, now: float) -> None: ...

    def governor_peak(self, model: str) -> GovernorPeak | None: ...


def policy_config(settings: Settings, config: ModelConfig) -> PolicyConfig:
    return PolicyConfig(
        ceiling=config.max_concurrency,
        floor=max(1, min(settings.governor_min_limit, config.max_concurrency)),
        ttft_inflation=settings.governor_ttft_inflation,
        tpot_inflation=settings.governor_tpot_inflation,
        window=settings.governor_window_seconds,
        day=max(settings.governor_day_seconds, settings.governor_window_seconds),
        idle_after=settings.governor_idle_seconds,
        abort=settings.governor_abort,
        defer_over=settings.governor_defer_prompt_tokens or None,
    )


def make_policy(settings: Settings, config: ModelConfig) -> GovernorPolicy | AimdPolicy:
    """The policy `governor_policy` names, for one model."""
    base = policy_config(settings, config)
    if settings.governor_policy != "aimd":
        return GovernorPolicy(base)
    if settings.governor_aimd_ttft_ms <= 0 or settings.governor_aimd_tpot_ms <= 0:
        raise ValueError(
            "governor_policy = 'aimd' needs governor_aimd_ttft_ms and governor_aimd_tpot_ms "
            "(the absolute p99 targets it keeps real time under)"
        )
    return AimdPolicy(
        AimdConfig(
            ceiling=base.ceiling,
            floor=base.floor,
            ttft_target=settings.governor_aimd_ttft_ms / 1e3,
            tpot_target=settings.governor_aimd_tpot_ms / 1e3,
            abort=False,
        )
    )


class Governor:
    def __init__(
        self,
        dispatcher: Dispatcher,
        stats: RealtimeStats,
        policy: GovernorPolicy | AimdPolicy,
        *,
        interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        peaks: PeakStore | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.dispatcher = dispatcher
        self.engine: Engine = dispatcher.engine
        self.stats = stats
        self.policy = policy
        self.interval = interval
        self.peaks = peaks
        self._wall = wall_clock
        self._peak_saved = -float("inf")  # wall clock of the last save (or try)
        self.history: deque[tuple[float, Decision]] = deque(maxlen=100_000)
        self._clock = clock
        self._arrivals = stats.arrivals
        self._throttled = dispatcher.stats.throttled
        self._tpot_sum: float | None = None
        self._tpot_count: float | None = None
        self._tpot_name: str | None = None
        #: the last tick's engine figures; None: the governor runs on the gateway's alone
        self.engine_load: EngineLoad | None = None
        #: the `EngineLoad` fields the engine did not serve at the last tick (read as 0)
        self.engine_missing: frozenset[str] = frozenset()
        self._on_engine: bool | None = None  # logged when it changes
        self._misses = 0  # scrapes in a row without engine figures
        self._next_scrape = -float("inf")
        self._metrics_seen = False
        self._last_good: tuple[float, EngineLoad] | None = None  # (when, what) last read

    async def load(self) -> EngineLoad | None:
        engine = self.engine
        if not isinstance(engine, MetricsSource):
            return None
        metrics = await engine.load_metrics()
        if not metrics:
            return None
        running = first_of(metrics, RUNNING)
        if running is None:
            return None
        tpot: float | None = None
        for sum_name, count_name in TPOT:
            total = metrics.get(sum_name)
            count = metrics.get(count_name)
            if total is None or count is None:
                continue
            if sum_name != self._tpot_name:  # first scrape, or another family: a new baseline
                self._tpot_name, self._tpot_sum, self._tpot_count = sum_name, None, None
            if self._tpot_count is not None and self._tpot_sum is not None:
                tokens = count - self._tpot_count
                if tokens > 0:
                    tpot = (total - self._tpot_sum) / tokens
            self._tpot_sum, self._tpot_count = total, count
            break
        waiting = first_of(metrics, WAITING)
        kv_usage = first_of(metrics, KV_USAGE)
        self.engine_missing = frozenset(
            name for name, value in (("waiting", waiting), ("kv_usage", kv_usage)) if value is None
        )
        return EngineLoad(
            running=running,
            waiting=waiting or 0.0,
            kv_usage=kv_usage or 0.0,
            tpot=tpot,
        )

    async def scrape(self) -> EngineLoad | None:
        """`load()`, unless the last scrapes read nothing and the back-off says not yet (see
        the module doc)."""
        now = self._clock()
        if now < self._next_scrape:
            return self._held(now)
        engine_load = await self.load()
        if engine_load is not None:
            self._misses = 0
            self._metrics_seen = True
            self._next_scrape = -float("inf")
            self._last_good = (now, engine_load)
            return engine_load
        self._misses += 1
        cap = RESCRAPE_AFTER_METRICS if self._metrics_seen else RESCRAPE_SECONDS
        pause = min(cap, self.interval * 2.0 ** min(self._misses - 1, 30))
        self._next_scrape = now + pause
        return self._held(now)

    def _held(self, now: float) -> EngineLoad | None:
        """The last good reading, without its TPOT, while it is recent enough; else None."""
        if self._last_good is None or now - self._last_good[0] > HOLD_READING_SECONDS:
            return None
        held = self._last_good[1]
        return EngineLoad(held.running, held.waiting, held.kv_usage, tpot=None)

    async def tick(self) -> Decision:
        engine_load = await self.scrape()
        self.engine_load = engine_load
        on_engine = engine_load is not None
        model = self.engine.model
        if on_engine != self._on_engine:
            self._on_engine = on_engine
            if on_engine:
                log.info("governor for %s: on the engine's metrics", model)
            elif not isinstance(self.engine, MetricsSource):
                log.info("governor for %s: on the gateway's latencies alone", model)
            else:
                log.info(
                    "governor for %s: on the gateway's latencies alone (no engine metrics "
                    "read; asked again at growing intervals, up to %g s)",
                    model,
                    RESCRAPE_AFTER_METRICS if self._metrics_seen else RESCRAPE_SECONDS,
                )
        stats = self.stats
        dstats = self.dispatcher.stats
        awaiting, waited = stats.awaiting()
        signals = Signals(
            now=self._clock(),
            rt_in_flight=stats.in_flight,
            rt_arrivals=stats.arrivals - self._arrivals,
            batch_in_flight=dstats.in_flight,
            batch_throttled=dstats.throttled - self._throttled,
            rt_tpot=tuple(stats.drain_tpots()),
            rt_ttft=tuple(stats.drain_ttfts()),
            rt_awaiting=awaiting,
            rt_waited=waited,
            engine=engine_load,
        )
        self._arrivals = stats.arrivals
        self._throttled = dstats.throttled
        decision = self.policy.decide(signals)
        before = self.history[-1][1] if self.history else None
        if decision.dormant and before is None:
            log.info(
                "governor for %s: dormant, batch at its ceiling (%d) until the first real-time "
                "request through the gateway",
                model,
                decision.limit,
            )
        elif before is not None and before.dormant and not decision.dormant:
            log.info(
                "governor for %s: awake (%s), limit %d",
                model,
                "engine metrics read" if on_engine else "first real-time request",
                decision.limit,
            )
        self.dispatcher.apply(decision)
        self.history.append((signals.now, decision))
        return decision

    # -- the reference peak across restarts (see the module doc) --------------------------------
    async def restore_peak(self) -> float | None:
        """Seed the policy with the model's last saved peak, unless none, too old or no store;
        returns the peak used."""
        policy = self.policy
        if self.peaks is None or not isinstance(policy, GovernorPolicy):
            return None
        model = self.engine.model
        try:
            peak = await asyncio.to_thread(self.peaks.governor_peak, model)
        except Exception:
            log.warning("governor for %s: stored peak not read", model, exc_info=True)
            return None
        if peak is None:
            return None
        age = self._wall() - peak.saved_at
        if age > policy.config.day or age < -60:  # old, or from a clock far ahead of ours
            log.info("governor for %s: stored peak %.0f s old, not used", model, age)
            return None
        policy.seed_reference(peak.reference, age)
        log.info(
            "governor for %s: starting from the stored real-time peak %.1f (seen %.0f s ago)",
            model,
            peak.reference,
            age,
        )
        return peak.reference

    async def save_peak(self) -> bool:
        """Save the day's peak and when it was seen if due (every `PEAK_SAVE_SECONDS`) and it
        is above 0; True if saved."""
        policy = self.policy
        if self.peaks is None or not isinstance(policy, GovernorPolicy):
            return False
        wall = self._wall()
        if wall - self._peak_saved < PEAK_SAVE_SECONDS:
            return False
        peak, age = policy.day_peak(self._clock())
        if peak <= 0:
            return False
        self._peak_saved = wall
        try:
            await asyncio.to_thread(
                self.peaks.save_governor_peak, self.engine.model, peak, wall - age
            )
        except Exception:
            log.warning("governor for %s: peak not saved", self.engine.model, exc_info=True)
            return False
        return True

    async def run(self, stop: asyncio.Event) -> None:
        await self.restore_peak()
        while not stop.is_set():
            started = self._clock()
            try:
                await self.tick()
                await self.save_peak()
            except Exception:
                log.exception("governor tick failed for %s", self.engine.model)
            delay = max(0.0, self.interval - (self._clock() - started))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
