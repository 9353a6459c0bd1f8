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

Without engine metrics the policy is dormant (the ceiling, nothing paced, deferred or shed)
until the first real-time request passes the gateway: with no real time there is nothing to
protect, and with metrics it may bypass the gateway, so then the policy runs from the start.
Without metrics it also watches real-time TTFT (`TtftGuard`): at an engine that runs few
requests at once, real time queues behind batch requests, which the step-time model cannot
see; the guard caps the batch at the level where TTFT stays near what it is at the floor.

The model, the formula and the measurements behind each choice: `docs/governor.md`.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass

from backfill.dispatch.signals import Signals


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    ceiling: int  # the model's max_concurrency
    floor: int = 1
    ttft_inflation: float = 1.10
    tpot_inflation: float = 1.20
    window: float = 60.0  # seconds of real-time load history (the reference peak)
    #: seconds of real-time load whose 98th percentile is planned for: quiet hours are planned
    #: against the day's busy hours, not their own (`GovernorPolicy.reference`)
    day: float = 86400.0
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
    #: without engine metrics: real-time TTFT above this many times its level with the batch at
    #: the floor means real time queues behind batch requests at the engine (`TtftGuard`)
    ttft_alarm: float = 2.0
    ttft_slack: float = 4.0  # ... plus this many real-time TPOTs (a few engine steps)
    ttft_jitter: float = 0.025  # ... and at least this many seconds (clocks, network)
    ttft_probe: int = 3  # TTFTs within the alarm at the guard's cap before it is raised


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
    #: no engine metrics and no real-time request seen yet: the ceiling, nothing else
    dormant: bool = False
    #: the batch level real-time TTFT allows (`TtftGuard`; None: not watching TTFT)
    ttft_cap: int | None = None


def quantile_of(counts: Counter[int], q: float) -> float:
    """The `q` quantile of the values counted (`value: times`), 0 for none."""
    total = sum(n for n in counts.values() if n > 0)
    if total <= 0:
        return 0.0
    rank = max(1, math.ceil(q * total))
    for value in sorted(counts):
        rank -= max(0, counts[value])
        if rank <= 0:
            return float(value)
    return float(max(counts))


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


class TtftGuard:
    """Without engine metrics: keeps real time from queueing behind batch requests at the engine.

    An engine that runs one request at a time (llama-cpp-python's server), or a few
    (llama-server's slots), queues what it cannot run: a real-time request then waits for batch
    requests to finish before its first token, while its TPOT does not move, so the step-time
    model (fitted on TPOT) sees nothing. The guard compares each streamed real-time TTFT with
    `ttft_alarm` x `base` (the median TTFT while the batch was at the floor) + `ttft_slack` x
    the median real-time TPOT, at least `ttft_jitter` (a TTFT of a few milliseconds doubles by
    waiting for the engine step in progress, or by a hiccup of the host, which is not
    queueing: waiting for a batch request ahead costs a good part of its whole duration), and
    keeps a cap on the batch:

    - until `base` is known (`ttft_probe` samples at the floor) the cap is the floor: without
      engine metrics nothing else says how many requests the engine runs at once;
    - a TTFT over that alarm (or a stream still waiting for its first bytes that long), of a
      request that arrived after the last cut, halves the batch level it waited
      under (the mean batch in flight over its wait, at most the cap), down to the floor;
    - TTFTs within the alarm, of requests that arrived after the last change and waited with
      the batch near the cap, raise the cap by half (at least one): `ttft_probe` of them at
      first; each cut doubles that count (up to 64) and each raise that held (the next change
      a raise too) halves it, so that an engine whose TTFT is only good at the floor is probed
      rarely, not every few requests.

    A cut returns True: the caller sheds every batch request over the new limit at once.
    """

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self.cap: float | None = None  # None: no streamed real-time request seen yet
        self._base: deque[float] = deque(maxlen=16)
        self._tpot: deque[float] = deque(maxlen=32)
        self._batch: deque[tuple[float, int]] = deque()  # (tick, batch in flight)
        self._cut_at = -math.inf  # evidence of requests that arrived before is not counted
        self._changed_at = -math.inf
        self._good = 0
        self._need = config.ttft_probe  # good TTFTs at the cap before it is raised
        self._raised = False  # the last change was a raise

    def base(self) -> float | None:
        """The median TTFT with the batch at the floor (None: too few samples yet)."""
        if len(self._base) < self.config.ttft_probe:
            return None
        ordered = sorted(self._base)
        return ordered[len(ordered) // 2]

    def alarm(self) -> float | None:
        """The TTFT above which real time queued behind the batch (None: no `base` yet)."""
        base = self.base()
        if base is None:
            return None
        c = self.config
        step = sorted(self._tpot)[len(self._tpot) // 2] if self._tpot else 0.0
        return c.ttft_alarm * base + max(c.ttft_jitter, c.ttft_slack * step)

    def _mean_batch(self, since: float) -> float:
        """Mean batch in flight over the ticks since `since` (the last tick if none)."""
        values = [n for t, n in self._batch if t >= since] or [self._batch[-1][1]]
        return sum(values) / len(values)

    def update(self, s: Signals) -> bool:
        """One tick's TTFTs and waiting streams; True when the cap was cut."""
        c = self.config
        self._batch.append((s.now, s.batch_in_flight))
        while self._batch[0][0] < s.now - c.window:
            self._batch.popleft()
        self._tpot.extend(s.rt_tpot)
        if self.cap is None:
            if not s.rt_ttft and s.rt_awaiting == 0:
                return False
            self.cap = float(c.floor)  # a streamed real-time request: watch its TTFT
            self._changed_at = self._cut_at = s.now
        cut = False
        for ttft in s.rt_ttft:
            cut = self._judge(s.now, s.now - ttft, ttft) or cut
        if s.rt_awaiting > 0:
            alarm = self.alarm()
            if alarm is not None and s.rt_waited > alarm:
                cut = self._judge(s.now, s.now - s.rt_waited, s.rt_waited, pending=True) or cut
        return cut

    def _judge(self, now: float, arrived: float, ttft: float, *, pending: bool = False) -> bool:
        c = self.config
        cap = self.cap
        assert cap is not None
        batch = self._mean_batch(arrived)
        if batch <= c.floor + 0.5 and not pending:
            self._base.append(ttft)
        alarm = self.alarm()
        if alarm is None:
            return False
        if ttft > alarm:
            if arrived < self._cut_at:
                return False  # it waited under a higher level, already cut for
            self._good = 0
            self._cut_at = now  # (a batch already at the floor restarts the count, too)
            lower = max(float(c.floor), math.floor(min(cap, batch) / 2))
            if lower >= cap:
                return False
            self.cap = lower
            self._changed_at = now
            self._need = min(64, 2 * self._need)  # a failed probe: the next one later
            self._raised = False
            return True
        if arrived >= self._changed_at and batch >= cap - 0.5:
            self._good += 1
            if self._good >= self._need:
                self.cap = min(float(c.ceiling), cap + max(1.0, cap / 2))
                self._changed_at = now
                self._good = 0
                if self._raised:
                    self._need = max(c.ttft_probe, self._need // 2)
                self._raised = True
        return False


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
        self.guard = TtftGuard(config)
        #: no engine metrics and no real-time request yet (see `_dormant`)
        self.dormant = True
        self._metrics_seen = False
        #: a reference peak from before a restart (`seed_reference`): (peak, seconds ago),
        #: then (peak, when it was seen on this policy's clock)
        self._seed: tuple[float, float] | None = None
        self._seed_pending = False
        #: the quantile of the load watched over the last window
        self.live_reference = 0.0
        #: the real-time load over the last `day`: per slot of 1/288 of it (5 minutes of a real
        #: day) (start, load: ticks), and their sum
        self._slots: deque[tuple[float, Counter[int]]] = deque()
        self._day_counts: Counter[int] = Counter()

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

    def seed_reference(self, peak: float, age: float = 0.0) -> None:
        """Start from `peak`, seen `age` seconds ago (the day's peak saved before a restart,
        `Governor.restore_peak`): it is remembered as if watched then, so it is the reference's
        floor until it is a `day` old. A fresh start then does not take the first seconds' load
        for the peak (and fill the valley as if bursts were that small, or call every return
        to the usual load a burst)."""
        self._seed = (peak, max(0.0, age)) if peak > 0 and age < self.config.day else None
        self._seed_pending = self._seed is not None

    def reference(self, now: float, load: int) -> float:
        """The real-time peak planned for: the higher of a high quantile of the real-time load
        over the last `window` and over the last `day` (and the seeded peak while it is younger
        than a day).

        Why the day's and not the window's alone: the budget is on real time's p99, and the
        day's p99 is set by its busiest hours. Against the window's own peak a quiet hour kept
        the batch to the headroom over that hour's small load (18.5% of the compressed day's
        idle capacity in `bench/harvest_sim.py`), its step time far below what the budget
        allows. The cost, stated in `docs/governor.md`: in a quiet hour, real time may see the
        step time of the day's busy hours (its own p99 rises; the day's stays inside the
        budget). The day's quantile, not the highest of the windows' quantiles: the highest of
        many windows' 98th percentiles is a rarer load than the day's 98th percentile, and
        planned against, it took a steady trace outside the budget."""
        history = self._history
        history.append((now, load))
        horizon = now - self.config.window
        while history and history[0][0] < horizon:
            history.popleft()
        live = self.live_reference = quantile_of(
            Counter(v for _, v in history), self.config.reference_quantile
        )
        slots, counts = self._slots, self._day_counts
        if not slots or now - slots[-1][0] >= self.config.day / 288:
            slots.append((now, Counter()))
        slots[-1][1][load] += 1
        counts[load] += 1
        while slots[0][0] < now - self.config.day:
            for value, n in slots.popleft()[1].items():
                counts[value] -= n
                if counts[value] <= 0:
                    del counts[value]
        planned = max(live, quantile_of(counts, self.config.reference_quantile))
        if self._seed is not None:
            peak, seen = self._seed
            if self._seed_pending:  # the first tick: its age becomes a time on our clock
                seen = now - seen
                self._seed, self._seed_pending = (peak, seen), False
            if seen < now - self.config.day:
                self._seed = None
            else:
                planned = max(planned, peak)
        return planned

    def day_peak(self, now: float) -> tuple[float, float]:
        """(the day's planned peak, seconds since it was seen: 0 unless the seed is it), for
        the governor to save; (0, 0) before any tick."""
        if not self._slots:
            return 0.0, 0.0
        value = quantile_of(self._day_counts, self.config.reference_quantile)
        if self._seed is not None and not self._seed_pending and self._seed[0] > value:
            return self._seed[0], max(0.0, now - self._seed[1])
        return value, 0.0

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
    def _dormant(self, s: Signals) -> Decision | None:
        """The decision while dormant: nothing to protect yet (None: awake now, for good).

        Without engine metrics the gateway sees all the real time there is: until its first
        request, the batch has the ceiling and is neither paced, deferred nor shed. Engine
        metrics wake the policy at once (real time may reach the engine past the gateway)."""
        if s.engine is None and s.rt_arrivals == 0 and s.rt_in_flight == 0:
            self.limit = self.config.ceiling
            self._last_activity = -math.inf  # woken by metrics alone: idle already
            return Decision(
                self.limit,
                knee=self.config.knee_prior,
                trim=self.trim,
                idle=True,
                burst=self.config.burst,
                dormant=True,
            )
        self.dormant = False
        return None

    def decide(self, s: Signals) -> Decision:
        c = self.config
        if self.dormant and (asleep := self._dormant(s)) is not None:
            return asleep
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
        # never any engine metrics: no queueing behind batch requests at the engine (TTFT);
        # once read, the engine's waiting count shows that (a failed scrape changes nothing)
        self._metrics_seen = self._metrics_seen or s.engine is not None
        cut = capped = False
        cap = None
        if not self._metrics_seen:
            cut = self.guard.update(s)
            cap = self.guard.cap
            if cap is not None and not idle and cap < target:
                target, capped = cap, True

        limit: float = self.limit
        if target < limit:
            limit = target
        elif s.now >= self._pause_until:
            limit = min(target, limit + max(1.0, c.growth * limit))
        self.limit = int(min(c.ceiling, max(c.floor, math.floor(limit))))

        shed = 0
        if c.abort and not idle:
            excess = s.batch_in_flight - self.limit
            # under the TTFT cap real time waits behind every one of these: shed them all
            if excess > max(4.0, 0.1 * self.limit) or ((cut or capped) and excess > 0):
                shed = excess
        # no pacing under the TTFT guard: its rate comes from batch latencies that include
        # queueing at the engine (measured at a higher limit, it starved the batch at a lower
        # one), and a handful of requests is no lump of prefills
        return Decision(
            self.limit,
            shed,
            pace=None if idle or cap is not None else c.pace,
            burst=c.burst,
            defer_over=None if idle else c.defer_over,
            target_total=target_total,
            reference=r_ref,
            knee=knee,
            trim=self.trim,
            idle=idle,
            ttft_cap=None if cap is None else int(cap),
        )
