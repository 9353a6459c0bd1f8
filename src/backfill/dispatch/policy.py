"""The governor's policy: how many batch requests a model may have in flight. No I/O, no clock.

`GovernorPolicy.decide(signals) -> Decision` is called every tick (~100 ms) with what the
gateway and the upstream's metrics say (`signals.Signals`); the governor hands the decision to
the model's `Dispatcher` (`apply`). Tests feed it synthetic signals.

Why this shape: the engine never preempts running requests and every step runs all sequences
together, so batch concurrency directly sets real-time per-token latency (the step time grows
as `a * (1 + n / K)`, K learned online). The operator's budget is p99 TTFT/TPOT inflation over
real time alone, and p99 is set by real time's peaks, so the policy fills the valleys up to the
load of the recent peak (`r_ref`) and keeps only a small headroom during bursts, seen early
from the arrival rate's lower bound. It yields in one tick (shedding the excess) and grows by
`growth` per tick; 429/503 halve the limit, a nearly full KV cache stops growth. While real
time is active it also turns on prefill pacing and long-prompt deferral.

The model, the formula and the measurements behind each choice: `docs/governor.md`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from backfill.dispatch.signals import Signals


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    ceiling: int  # the model's max_concurrency
    floor: int = 1
    ttft_inflation: float = 1.10
    tpot_inflation: float = 1.20
    window: float = 60.0  # seconds of real-time load history (the reference peak)
    idle_after: float = 5.0
    abort: bool = True
    knee_prior: float = 128.0
    margin: float = 0.8  # share of the allowed inflation the target plans to use
    growth: float = 0.5  # per tick, as a share of the current limit
    reference_quantile: float = 0.98
    forget: float = 0.995  # weight kept per sample by the knee fit
    throttle_pause: float = 2.0  # seconds without growth after a 429/503
    fill: float = 1.2  # share of the valley below the reference peak the batch may fill
    peak_share: float = 0.6  # share of the inflation budget the batch uses at the peak
    onset: float = 0.5  # seconds of arrivals behind the early estimate of real-time load
    onset_z: float = 1.5  # the estimate takes the rate's lower bound, count - z * sqrt(count)
    surge: float = 0.6  # expected load above this share of the peak: a burst, keep headroom only
    pace: float | None = 1.2  # prefill pacing while real time is active (None: off)
    burst: float = 1024.0  # prompt tokens the pacing lets through at once
    defer_over: float | None = None  # while real time is active, longer prompts go last


@dataclass(frozen=True, slots=True)
class Decision:
    limit: int
    shed: int = 0
    #: what it was based on (for logs, tests and benches)
    target_total: float = 0.0
    reference: float = 0.0
    knee: float = 0.0
    trim: float = 1.0
    idle: bool = False
    #: prefill pacing for the dispatcher's `Admission` (None: off) and its burst in tokens
    pace: float | None = None
    burst: float = 0.0
    #: batch requests with more estimated prompt tokens wait while others do (None: no limit)
    defer_over: float | None = None


class KneeFit:
    """Weighted least squares of `latency = a + b * n` with exponential forgetting."""

    def __init__(self, prior: float, forget: float) -> None:
        self.prior = prior
        self.forget = forget
        self.sw = self.sn = self.st = self.snn = self.snt = 0.0

    def add(self, n: float, latency: float, weight: float = 1.0) -> None:
        k = self.forget
        self.sw = self.sw * k + weight
        self.sn = self.sn * k + weight * n
        self.st = self.st * k + weight * latency
        self.snn = self.snn * k + weight * n * n
        self.snt = self.snt * k + weight * n * latency

    def params(self) -> tuple[float, float] | None:
        """(a, K) or None before any sample. K falls back to the prior until the samples'
        sequence counts spread over at least an eighth of it."""
        if self.sw <= 0:
            return None
        mean_n = self.sn / self.sw
        mean_t = self.st / self.sw
        var_n = self.snn / self.sw - mean_n * mean_n
        prior = self.prior
        if var_n >= (prior / 8) ** 2:
            b = (self.snt / self.sw - mean_n * mean_t) / var_n
            a = mean_t - b * mean_n
            if b > 0 and a > 0:
                return a, min(max(a / b, prior / 4), prior * 8)
        return mean_t / (1 + mean_n / prior), prior


class GovernorPolicy:
    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        start = max(config.floor, round(config.knee_prior * (config.tpot_inflation - 1)))
        self.limit = min(config.ceiling, start)
        self.fit = KneeFit(config.knee_prior, config.forget)
        self.trim = 1.0
        self._history: deque[tuple[float, int]] = deque()
        self._last_activity: float | None = None
        self._pause_until = -math.inf
        self._arrivals: deque[tuple[float, int]] = deque()
        self._little_load = 0.0  # running sums for Little's law: load = rate x duration
        self._little_arrivals = 0.0

    # -- pieces ---------------------------------------------------------------------------------
    def realtime_load(self, s: Signals) -> int:
        """Real-time sequences at the engine now: the gateway's, or more if the engine shows
        load that is neither ours nor the gateway's."""
        load = s.rt_in_flight
        if s.engine is not None:
            other = s.engine.running + s.engine.waiting - s.batch_in_flight
            slack = 2 + 0.1 * s.batch_in_flight  # scrape and counters are not simultaneous
            load = max(load, math.floor(other - slack))
        return max(0, load)

    def early_load(self, s: Signals, load: int) -> tuple[float, float]:
        """Real-time load to expect soon: the arrival rate of the last `onset` seconds times
        the mean time a request stays (Little's law over the long run). A burst raises the
        arrival rate at once but the load in flight only over a request's duration: this
        sees it within a few ticks. Returns (from the count's lower bound, from the count):
        the first decides, the second only warns (see `decide`)."""
        arrivals = self._arrivals
        arrivals.append((s.now, s.rt_arrivals))
        while arrivals and arrivals[0][0] < s.now - self.config.onset:
            arrivals.popleft()
        keep = 0.999
        self._little_load = self._little_load * keep + load
        self._little_arrivals = self._little_arrivals * keep + s.rt_arrivals
        if self._little_arrivals <= 0 or len(arrivals) < 2:
            return float(load), float(load)
        span = arrivals[-1][0] - arrivals[0][0]
        if span <= 0:
            return float(load), float(load)
        count = sum(n for _, n in list(arrivals)[1:])
        per_tick = self._little_load / self._little_arrivals  # ticks a request stays
        tick = span / (len(arrivals) - 1)
        # a Poisson count of n has a spread of sqrt(n): half a second holds only a few arrivals
        # at a moderate rate, and its plain rate would see bursts that are not there
        bound = max(0.0, count - self.config.onset_z * math.sqrt(count))
        scale = per_tick * tick / span  # load per arrival counted
        return max(float(load), bound * scale), max(float(load), count * scale)

    def reference(self, now: float, load: int) -> float:
        """A high quantile of the real-time load over the window."""
        history = self._history
        history.append((now, load))
        horizon = now - self.config.window
        while history and history[0][0] < horizon:
            history.popleft()
        ordered = sorted(v for _, v in history)
        index = min(len(ordered) - 1, math.ceil(self.config.reference_quantile * len(ordered)) - 1)
        return float(ordered[max(0, index)])

    def _learn(self, s: Signals, load: int) -> None:
        if s.engine is not None:
            if s.engine.tpot is not None and s.engine.running > 0:
                self.fit.add(s.engine.running, s.engine.tpot)
            return
        n = load + s.batch_in_flight
        for tpot in s.rt_tpot:
            self.fit.add(n, tpot)

    def _measured_step(self, s: Signals) -> float | None:
        if s.engine is not None:
            return s.engine.tpot
        if s.rt_tpot:
            return sorted(s.rt_tpot)[len(s.rt_tpot) // 2]
        return None

    # -- the decision ---------------------------------------------------------------------------
    def decide(self, s: Signals) -> Decision:
        c = self.config
        load = self.realtime_load(s)
        if self._last_activity is None or s.rt_arrivals > 0 or load > 0:
            self._last_activity = s.now  # (the first tick counts: idle only after idle_after)
        r_ref = self.reference(s.now, load)
        self._learn(s, load)
        params = self.fit.params()
        a, knee = params if params is not None else (0.0, c.knee_prior)

        factors = [1 + c.margin * (x - 1) for x in (c.ttft_inflation, c.tpot_inflation)]
        f = min(factors)
        # model check: is the step time within the budget the target planned for?
        measured = self._measured_step(s)
        if measured is not None and a > 0 and load > 0:
            budget = f * a * (1 + r_ref / knee)
            if measured > budget * 1.05:
                self.trim = max(0.25, self.trim * 0.97)
            elif measured < budget:
                self.trim = min(1.0, self.trim * 1.005)
        headroom = (f - 1) * (r_ref + knee * self.trim) * c.peak_share
        expected, suspected = self.early_load(s, load)
        valley = 0.0 if expected >= c.surge * r_ref else c.fill * max(0.0, r_ref - expected)
        target_total = expected + valley + headroom
        idle = (
            load == 0
            and s.rt_arrivals == 0
            and self._last_activity is not None
            and s.now - self._last_activity >= c.idle_after
        )
        target = float(c.ceiling) if idle else target_total - expected
        if valley > 0 and suspected >= c.surge * r_ref:
            # the plain count says burst, its lower bound not yet: send nothing new until it
            # is clear (no new batch prefill lands at a burst's onset; a false alarm only
            # pauses sending for a tick or two), shed nothing
            target = min(target, float(s.batch_in_flight))

        if s.engine is not None and s.engine.kv_usage >= 0.95:
            target = min(target, max(c.floor, s.batch_in_flight * 0.9))
            self._pause_until = max(self._pause_until, s.now + c.throttle_pause)
        if s.batch_throttled > 0:
            target = min(target, self.limit / 2)
            self._pause_until = s.now + c.throttle_pause

        limit: float = self.limit
        if target < limit:
            limit = target
        elif s.now >= self._pause_until:
            limit = min(target, limit + max(1.0, c.growth * limit))
        self.limit = int(min(c.ceiling, max(c.floor, math.floor(limit))))

        shed = 0
        if c.abort and not idle:
            excess = s.batch_in_flight - self.limit
            if excess > max(4.0, 0.1 * self.limit):
                shed = excess
        return Decision(
            self.limit,
            shed,
            pace=None if idle else c.pace,
            burst=c.burst,
            defer_over=None if idle else c.defer_over,
            target_total=target_total,
            reference=r_ref,
            knee=knee,
            trim=self.trim,
            idle=idle,
        )
