"""`bench/harvest.py` in simulated time, without HTTP: fast, deterministic policy tuning.

    python bench/harvest_sim.py [--only abc] [--duration 240] [--speedup 2] [--quiet 60]
                                [--oracle 100 130 160] [--engine k=v ...] [--policy k=v ...]

The same real-time trace and the same 10,000-request batch as `bench/harvest.py` are replayed
straight into `backfill.sim.engine.Engine` (no server, no sockets), with a faithful in-process
model of what backfill does around it:

- the gateway: real-time requests go in at their arrival with priority 0; "in flight" is the
  gateway's count (arrived, not finished);
- the worker + dispatcher: the worker keeps up to `max_concurrency` batch requests waiting on
  the dispatcher (its lookahead), the dispatcher sends them in file order within its limit,
  at priority 10 (admission through the real `dispatch.admission.Admission` when the
  governor is on); shed requests are aborted at the engine and go back to the end of the queue,
  re-sent with the same prompt (prefix-cache hits);
- the governor: the real `dispatch.policy.GovernorPolicy` every `--interval` wall seconds
  (`interval * speedup` simulated seconds, as in the HTTP bench), fed what it would read from
  vLLM's /metrics (running, waiting, KV usage, the TPOT histogram's deltas) and the gateway.

`--oracle V ...` adds, per valley limit V, a policy that knows the trace's burst schedule:
limit V in the valleys, `--oracle-burst` (5) during bursts, with the governor's pacing and
shedding. Sweeping V draws the frontier that any concurrency limit with this pacing can reach
(latency inflation against idle capacity used), and shows how far the governor, which has to
detect bursts, is from it. `--engine k=v` overrides simulator profile fields (for example
`long_prefill_token_threshold=128` or `max_num_batched_tokens=512`) for every policy and for
the capacity measurement alike. `--quiet S` runs S more simulated seconds without real time
after the trace (not measured) and says how many long-prompt batch requests (deferred while
real time was active) finished during the trace and in that quiet period.

Wall-clock effects of the real run are not modelled: HTTP and scrape delays, the simulator's
lag on a busy host, the gateway's streaming chunking. Use it to compare policies, then confirm
with the real run. Prints the same table as `bench/harvest.py`; as there, the run goes on
after the trace until its last real-time request has finished (the batch still running), and
only batch requests that finished inside the window count.
"""

from __future__ import annotations

import argparse
import heapq
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from statistics import mean
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from backfill.dispatch.admission import Admission
from backfill.dispatch.policy import Decision, GovernorPolicy, PolicyConfig
from backfill.dispatch.signals import EngineLoad, Signals
from backfill.sim import Distribution, SimRequest, get_profile, sharegpt_like
from backfill.sim.engine import FINISHED, Engine
from backfill.sim.tokens import Prompt
from harvest import BURST, CYCLE, LOAD, LONG, PROFILE, length, saturated_capacity, trace, verdict

#: the product's default: batch prompts over this many tokens wait while real time is active
DEFER_OVER = LONG or None


@dataclass
class Run:
    name: str
    rt: list[SimRequest] = field(default_factory=list)
    batch_done: list[SimRequest] = field(default_factory=list)
    limits: list[tuple[float, int]] = field(default_factory=list)
    decisions: list[tuple[float, Decision]] = field(default_factory=list)
    shed: int = 0
    waiting_long: int = 0  # long-prompt batch requests not sent yet at the end


@dataclass
class BatchItem:
    index: int
    prompt: Prompt
    max_tokens: int
    tokens: int  # the dispatcher's estimate of the prompt tokens
    sends: int = 0
    sent_at: float = 0.0


def simulate(
    name: str,
    items: list[tuple[float, int, int]],
    batch: list[tuple[int, int]] | None,
    args: argparse.Namespace,
    *,
    governor: bool,
    ceiling: int,
    oracle: int | None = None,
) -> Run:
    engine = Engine(get_profile(PROFILE, **args.engine_overrides))
    run = Run(name)
    speedup = args.speedup
    tick_sim = args.interval * speedup
    delay = args.send_delay * speedup  # wall seconds from a free slot to the engine, in sim s
    overrides = {k: float(v) for k, v in (kv.split("=") for kv in args.policy)}
    defer_over = overrides.pop("defer_over", DEFER_OVER) or None  # defer_over=0: off
    policy = (
        GovernorPolicy(
            PolicyConfig(
                ceiling=ceiling,
                window=args.window,
                idle_after=args.idle_after,
                defer_over=defer_over,
                **overrides,  # type: ignore[arg-type]
            )
        )
        if governor
        else None
    )
    admission = Admission(ceiling if policy is None else policy.limit)
    clock = lambda: engine.now / speedup  # noqa: E731 (the dispatcher's wall clock)
    pending: list[BatchItem] = []  # waiting on the dispatcher, in the worker's order
    feed = iter(enumerate(batch or []))
    in_flight: dict[SimRequest, BatchItem] = {}  # insertion order = send order
    arriving: list[tuple[float, int, SimRequest, BatchItem | None]] = []  # (at, seq, request)
    seq = 0
    defer: float | None = None  # prompt tokens above which batch requests wait (policy)
    rt_live: set[SimRequest] = set()
    rt_arrivals = 0
    next_rt = 0
    next_tick = 0.0
    tpot_sum = tpot_count = 0.0
    end = args.duration + args.quiet  # no real-time arrival after the trace's duration

    def shed(n: int) -> None:
        """Abort the `n` newest batch requests at the engine (as `Dispatcher.shed`); they go
        back to the end of the queue."""
        for r in list(in_flight)[-n:]:
            pending.append(in_flight.pop(r))
            engine.abort(r)
            run.shed += 1

    lookahead = ceiling * (2 if policy is not None and policy.config.defer_over else 1)

    def refill() -> None:
        while len(pending) + len(in_flight) < lookahead:
            got = next(feed, None)
            if got is None:
                return
            i, (p, o) = got
            prompt = Prompt.synthetic(p, ("batch", i))
            pending.append(BatchItem(i, prompt, o, p))

    def send_batch(now: float) -> None:
        nonlocal seq
        refill()
        while pending:
            eligible = list(range(len(pending)))
            if defer is not None:  # long prompts wait, unless nothing else is waiting
                eligible = [i for i in eligible if pending[i].tokens <= defer] or eligible
            choice = admission.pick([pending[i].tokens for i in eligible], len(in_flight), clock())
            if choice is None:
                return
            item = pending.pop(eligible[choice])
            admission.sent(item.tokens)
            item.sends += 1
            item.sent_at = clock()
            request = SimRequest(
                f"b{item.index}.{item.sends}", item.prompt, item.max_tokens, priority=10
            )
            in_flight[request] = item
            seq += 1
            heapq.heappush(arriving, (now + delay, seq, request, item))
            refill()

    while True:
        now = engine.now
        if now >= end and not rt_live:  # (as the HTTP bench, the trace's last streams end)
            break
        # real-time arrivals up to now
        while next_rt < len(items) and items[next_rt][0] <= now:
            t, p, o = items[next_rt]
            r = SimRequest(
                f"rt{next_rt}", Prompt.synthetic(p, ("rt", next_rt)), o, priority=0, arrival=t
            )
            engine.add(r)
            rt_live.add(r)
            run.rt.append(r)
            rt_arrivals += 1
            next_rt += 1
        # the oracle: the burst schedule is known, the limit is set by phase (same tick, same
        # pacing and shedding as the governor, so only the knowledge differs)
        while oracle is not None and policy is not None and next_tick <= now:
            limit = args.oracle_burst if now % CYCLE >= CYCLE - BURST else oracle
            admission.configure(limit, policy.config.pace, policy.config.burst)
            defer = policy.config.defer_over
            run.limits.append((next_tick, limit))
            excess = len(in_flight) - limit
            if excess > max(4.0, 0.1 * limit):  # the policy's hysteresis
                shed(excess)
            next_tick += tick_sim
        # governor ticks
        while oracle is None and policy is not None and next_tick <= now:
            m = engine.metrics
            tpot = None
            if m.tpot.count > tpot_count:
                tpot = (m.tpot.sum - tpot_sum) / (m.tpot.count - tpot_count)
            tpot_sum, tpot_count = m.tpot.sum, m.tpot.count
            signals = Signals(
                now=next_tick / speedup,
                rt_in_flight=len(rt_live),
                rt_arrivals=rt_arrivals,
                batch_in_flight=len(in_flight),
                engine=EngineLoad(
                    running=float(engine.num_running),
                    waiting=float(engine.num_waiting),
                    kv_usage=engine.kv.usage,
                    tpot=tpot,
                ),
            )
            rt_arrivals = 0
            decision = policy.decide(signals)
            admission.configure(decision.limit, decision.pace, decision.burst)
            defer = decision.defer_over
            run.limits.append((next_tick, decision.limit))
            run.decisions.append((next_tick, decision))
            if decision.shed > 0:
                shed(decision.shed)
            next_tick += tick_sim
        send_batch(now)
        while arriving and arriving[0][0] <= now:
            _, _, r, _ = heapq.heappop(arriving)
            if r in in_flight:
                r.arrival = now
                engine.add(r)
        result = engine.step()
        if result is None:  # nothing to run: jump to the next event
            upcoming = [end]
            if next_rt < len(items):
                upcoming.append(items[next_rt][0])
            if arriving:
                upcoming.append(arriving[0][0])
            if policy is not None:
                upcoming.append(next_tick)
            engine.now = max(engine.now, min(upcoming))
            continue
        for r in result.finished:
            if r in rt_live:
                rt_live.discard(r)
            elif r in in_flight:
                item = in_flight.pop(r)
                admission.answered(item.tokens, clock() - item.sent_at)
                run.batch_done.append(r)
    run.waiting_long = sum(1 for it in pending if it.tokens > LONG)
    return run


def summarize(run: Run, lo: float, hi: float) -> dict[str, float]:
    inside = [r for r in run.rt if lo <= r.arrival <= hi and r.status == FINISHED]
    timings = [r.timings() for r in inside]
    ttft = Distribution.of([t["ttft_s"] for t in timings])
    tpot = Distribution.of([t["tpot_s"] for t in timings if t["tpot_s"] > 0])
    seconds = hi - lo
    rt_tokens = sum(
        r.prompt_len + r.num_output for r in run.rt if r.finished and lo <= r.finish_time <= hi
    )
    batch_tokens = sum(
        r.prompt_len + r.num_output
        for r in run.batch_done
        if r.status == FINISHED and lo <= r.finish_time <= hi
    )
    return {
        "n": len(inside),
        "ttft50": ttft.p50 * 1e3,
        "ttft99": ttft.p99 * 1e3,
        "tpot50": tpot.p50 * 1e3,
        "tpot99": tpot.p99 * 1e3,
        "rt_tps": rt_tokens / seconds,
        "batch_tps": batch_tokens / seconds,
    }


def describe(run: Run, args: argparse.Namespace) -> None:
    """The limit over time, batch and real-time throughput and latencies by phase."""
    tick = args.interval * args.speedup  # simulated seconds between decisions
    if run.limits:
        for t0 in range(60, int(args.duration), 60):
            seg = [lim for t, lim in run.limits if t0 <= t < t0 + 60]
            print(f"  limits {t0}-{t0 + 60}s every {8 * tick:g} s: " + " ".join(map(str, seg[::8])))
            ds = [d for t, d in run.decisions if t0 <= t < t0 + 60][::40]
            if ds:
                print(
                    f"    every {40 * tick:g} s: reference/knee/trim "
                    + ", ".join(f"{d.reference:.0f}/{d.knee:.0f}/{d.trim:.2f}" for d in ds)
                )
    for part, (lo, hi) in {"valley": (0.0, CYCLE - BURST), "burst": (CYCLE - BURST, CYCLE)}.items():
        span = (args.duration - args.warmup) * (hi - lo) / CYCLE
        btok = sum(
            r.prompt_len + r.num_output
            for r in run.batch_done
            if r.finish_time >= args.warmup and lo <= r.finish_time % CYCLE < hi
        )
        rtok = sum(
            r.prompt_len + r.num_output
            for r in run.rt
            if r.finished and r.finish_time >= args.warmup and lo <= r.finish_time % CYCLE < hi
        )
        print(f"  {part:>6}: batch {btok / span:,.0f} tok/s, real time {rtok / span:,.0f}")
        inside = [
            r.timings()
            for r in run.rt
            if r.finished and r.arrival >= args.warmup and lo <= r.arrival % CYCLE < hi
        ]
        ttft = Distribution.of([t["ttft_s"] for t in inside])
        tpot = Distribution.of([t["tpot_s"] for t in inside if t["tpot_s"] > 0])
        print(
            f"  {part:>6} ({len(inside)} rt): TTFT p50 {ttft.p50 * 1e3:.1f} p99 "
            f"{ttft.p99 * 1e3:.1f}, TPOT p50 {tpot.p50 * 1e3:.1f} p99 {tpot.p99 * 1e3:.1f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--speedup", type=float, default=2.0, help="of the HTTP run modelled")
    parser.add_argument("--duration", type=float, default=240.0, help="trace, simulated seconds")
    parser.add_argument("--warmup", type=float, default=60.0, help="simulated seconds")
    parser.add_argument("--early", type=float, default=30.0, help="also measured from here")
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--window", type=float, default=60.0, help="governor window, wall s")
    parser.add_argument("--idle-after", type=float, default=5.0, help="wall s")
    parser.add_argument("--interval", type=float, default=0.1, help="governor tick, wall s")
    parser.add_argument("--send-delay", type=float, default=0.002, help="wall s per send")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--seeds", type=int, nargs="*", default=[], help="several seeds: mean and worst"
    )
    parser.add_argument("--only", default="abc")
    parser.add_argument(
        "--quiet", type=float, default=0.0, help="simulated seconds without real time after it"
    )
    parser.add_argument("--verbose", action="store_true", help="print the limit over time")
    parser.add_argument("--policy", nargs="*", default=[], help="PolicyConfig overrides k=v")
    parser.add_argument("--engine", nargs="*", default=[], help="sim profile overrides k=v")
    parser.add_argument(
        "--oracle",
        type=int,
        nargs="*",
        default=[],
        help="also run an oracle that knows the burst schedule, one per valley limit given",
    )
    parser.add_argument("--oracle-burst", type=int, default=5, help="the oracle's burst limit")
    args = parser.parse_args()
    args.engine_overrides = {k: int(v) for k, v in (kv.split("=") for kv in args.engine)}

    wall0 = time.monotonic()
    if args.seeds:
        over_seeds(args)
    else:
        one_seed(args, args.seed, show=True)
    print(f"wall {time.monotonic() - wall0:.0f} s")
    return 0


def one_seed(
    args: argparse.Namespace, seed: int, show: bool
) -> dict[str, tuple[float, float, float]]:
    """Run the policies on one seed's trace and batch; print the table when `show`. Returns
    per policy but (a): p99 TTFT and TPOT over (a)'s, and the share of the idle capacity."""
    mix = sharegpt_like(args.batch, seed=seed + 1)
    batch = [(length(r.prompt), r.max_tokens) for r in mix]
    capacity = saturated_capacity(batch, **args.engine_overrides)
    items, rate = trace(capacity, args.duration, seed)
    say = print if show else lambda *_: None
    say(
        f"GPU: {PROFILE} (simulated, sim time only); saturated capacity on the batch mix: "
        f"{capacity:,.0f} tokens/s; real-time trace: {len(items)} requests over "
        f"{args.duration:g} s, mean {rate:.1f} req/s (~{LOAD:.0%} of capacity)"
    )
    plan: dict[str, tuple[list[tuple[int, int]] | None, bool, int]] = {
        "a": (None, False, 256),
        "b": (batch, False, 256),
        "c": (batch, True, 1024),
    }
    labels = {"a": "(a) real-time alone", "b": "(b) + batch, fixed 256", "c": "(c) + governor"}
    only = args.only if "a" in args.only or not args.seeds else "a" + args.only
    runs: list[tuple[str, list[tuple[int, int]] | None, bool, int, int | None]] = [
        (labels[name], *plan[name], None) for name in only
    ]
    runs += [(f"(o) oracle, valley {v}", batch, True, 1024, v) for v in args.oracle]
    rows: dict[str, dict[str, Any]] = {}
    early: dict[str, dict[str, Any]] = {}  # measured from --early (the cold start included)
    for label, work, governor, ceiling, oracle in runs:
        run = simulate(label, items, work, args, governor=governor, ceiling=ceiling, oracle=oracle)
        rows[label] = summarize(run, args.warmup, args.duration)
        rows[label]["shed"] = run.shed
        early[label] = summarize(run, args.early, args.duration)
        if args.quiet and work is not None:
            long = [r for r in run.batch_done if r.prompt_len > LONG]
            after = sum(1 for r in long if r.finish_time > args.duration)
            say(
                f"{label}: long prompts finished {len(long) - after} during the trace, {after} in "
                f"the {args.quiet:g} s quiet period after it; {run.waiting_long} still waiting"
            )
            last = max((r.finish_time for r in run.batch_done), default=0.0)
            say(  # (a shed request is aborted, so each request finishes once)
                f"{label}: {len(run.batch_done):,} of {len(work):,} batch requests done, "
                f"the last at {last:.0f} s"
            )
        if args.verbose and show:
            print(label)
            describe(run, args)
    idle = capacity - rows[labels["a"]]["rt_tps"] if labels["a"] in rows else float("nan")
    say(
        f"{'policy':<26}{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}{'TPOT p99':>10}"
        f"{'rt tok/s':>10}{'batch tok/s':>12}{'idle used':>10}{'shed':>7}"
    )
    for label, s in rows.items():
        say(
            f"{label:<26}{s['ttft50']:>8.1f}ms{s['ttft99']:>8.1f}ms{s['tpot50']:>8.1f}ms"
            f"{s['tpot99']:>8.1f}ms{s['rt_tps']:>10,.0f}{s['batch_tps']:>12,.0f}"
            f"{s['batch_tps'] / idle:>10.0%}{s['shed']:>7}"
        )
    if labels["a"] not in rows:
        return {}
    a = rows[labels["a"]]
    for label, s in rows.items():
        if label != labels["a"]:
            say(verdict(label, s, a, idle))
    a_early = early[labels["a"]]
    for label, s in early.items():
        if label != labels["a"]:
            say(
                f"  from {args.early:g} s, "
                + verdict(label, s, a_early, capacity - a_early["rt_tps"])
            )
    return {
        label: (s["ttft99"] / a["ttft99"], s["tpot99"] / a["tpot99"], s["batch_tps"] / idle)
        for label, s in rows.items()
        if label != labels["a"]
    }


def over_seeds(args: argparse.Namespace) -> None:
    """`--seeds`: one process per seed (as many at once as there are cores); per policy the
    mean and the worst seed of each ratio, then each seed's."""
    with ProcessPoolExecutor(max_workers=min(len(args.seeds), os.cpu_count() or 1)) as pool:
        results = list(pool.map(one_seed, repeat(args), args.seeds, repeat(False)))
    print(f"seeds {' '.join(map(str, args.seeds))}; window from {args.warmup:g} s")
    print(
        f"{'policy':<26}{'TTFT p99 x':>12}{'(worst)':>8}{'TPOT p99 x':>12}{'(worst)':>8}"
        f"{'idle used':>10}{'(least)':>8}"
    )
    for label in results[0]:
        ttft, tpot, share = zip(*(r[label] for r in results), strict=True)
        print(
            f"{label:<26}{mean(ttft):>11.3f}x{max(ttft):>7.2f}x{mean(tpot):>11.3f}x"
            f"{max(tpot):>7.2f}x{mean(share):>10.1%}{min(share):>8.0%}"
        )
    for seed, r in zip(args.seeds, results, strict=True):
        print(
            f"  seed {seed}: "
            + "; ".join(f"{k} {t:.2f}x / {p:.2f}x / {u:.0%}" for k, (t, p, u) in r.items())
        )


if __name__ == "__main__":
    sys.exit(main())
