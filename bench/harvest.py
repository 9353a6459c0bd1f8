"""Harvest idle capacity without hurting real-time traffic: the policies on one simulated GPU.

    python bench/harvest.py [--speedup 2] [--duration 240] [--batch 10000] [--only abcd]
                            [--fixed 32 64]

One `backfill sim` (llama-3.1-8b on one H100, vLLM v1 scheduler) serves, one after the other:

  (a) real-time alone: an open-loop trace (Poisson arrivals averaging 40% of the GPU's
      saturated token throughput, in cycles of 45 s at the base rate and 15 s at 3x), streamed
      through backfill's real-time gateway with aiohttp;
  (b) the same trace + a 10,000-request batch through backfill's Batch API at a fixed 256 in
      flight, governor off (what a plain client loop or `vllm run-batch` does);
  (c) the same trace + the same batch with backfill's governor;
  (d) the same with the AIMD admission baseline (`governor_policy = "aimd"`, its targets the
      budget x (a)'s p99s, converted to wall ms);
  and with `--fixed N ...`, a fixed window of N (governor off) per level.

The oracle frontier needs the burst schedule inside the server, which no product setting
gives: `bench/harvest_sim.py` computes it on this same trace (same seed) in simulated time.

Every latency is the simulator's exact simulated figure (the `sim` field of each answer), not
wall time. The measured window is the trace after a warm-up (`--warmup` simulated seconds)
up to its end (not the drain after its last arrival);
batch tokens count the requests that finished inside it (the batch is cancelled at the trace's
end). Idle capacity = the GPU's saturated throughput on the batch's mix (measured offline with
`Simulator.run_offline` in this run, over the steady part of the run) minus the real-time
tokens/s of (a). Tokens are prompt + completion tokens.

Targets for (c): p99 TTFT <= 1.10x and p99 TPOT <= 1.20x of (a), >= 75% of the idle capacity.

Speedup: the trace is replayed in wall time divided by `--speedup`, so every wall-clock hiccup
of this 3-process run (load generator, backfill, simulator) lands `speedup` times larger in
simulated time and bunches arrivals. On a 2-core machine, speedup 4 gave (a) a p99 TTFT of
386-408 ms in two runs (the same trace in `bench/harvest_sim.py`, with no wall clock: 141 ms);
speedup 2 gave 146 ms. Hence the default of 2 (about 7 minutes); use 1 on a busy machine.
Real-time errors are listed by kind under each phase.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from openai import OpenAI

from backfill.settings import Settings
from backfill.sim import Simulator, sharegpt_like
from backfill.sim.metrics import parse
from backfill.sim.offline import Distribution
from backfill.sim.process import SimProcess, start_sim
from backfill.sim.tokens import Prompt
from backfill.testing.server import BackfillProcess

PROFILE = "llama-3.1-8b-h100"
KEY = "sk-harvest"
LOAD = 0.40
CYCLE, BURST, BURST_X = 60.0, 15.0, 3.0  # seconds per cycle, burst seconds at the end, factor
LONG = Settings.model_fields["governor_defer_prompt_tokens"].default  # deferred while rt active


def words(prefix: str, prompt_tokens: int) -> str:
    """A chat message whose prompt is `prompt_tokens` tokens for the sim (template: 8 tokens),
    unique from its first word (no prefix shared between requests)."""
    n = max(1, prompt_tokens - 8)
    return " ".join([prefix] + ["w"] * (n - 1))


def length(prompt: Prompt | int) -> int:
    return prompt if isinstance(prompt, int) else prompt.num_tokens


def trace(
    capacity: float, duration: float, seed: int
) -> tuple[list[tuple[float, int, int]], float]:
    """Open-loop arrivals (simulated seconds, prompt tokens, max tokens) and the mean rate."""
    mix = sharegpt_like(20000, seed=seed)
    mean_tokens = sum(length(r.prompt) + r.max_tokens for r in mix) / len(mix)
    mean_rate = LOAD * capacity / mean_tokens
    base = mean_rate * CYCLE / (CYCLE - BURST + BURST * BURST_X)
    rng = random.Random(seed)
    out: list[tuple[float, int, int]] = []
    t = 0.0
    i = 0
    while True:
        rate = base * (BURST_X if (t % CYCLE) >= CYCLE - BURST else 1.0)
        t += rng.expovariate(rate)
        if t >= duration:
            return out, mean_rate
        r = mix[i % len(mix)]
        i += 1
        out.append((t, length(r.prompt), r.max_tokens))


#: the diurnal trace: real-time rate per hour of the day as a share of its peak hour (a
#: service with users in one region: quiet from midnight to 6, busy from 10 to 17)
DAY = (0.12, 0.08, 0.06, 0.06, 0.08, 0.12, 0.25, 0.45, 0.65, 0.8, 0.92, 1.0,
       1.0, 0.95, 0.95, 0.92, 0.88, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)  # fmt: skip
DAY_PEAK_LOAD = 0.65  # the peak hour's real-time tokens as a share of the capacity


def diurnal_trace(
    capacity: float, hour: float, seed: int
) -> tuple[list[tuple[float, int, int]], float]:
    """A compressed day: 24 "hours" of `hour` simulated seconds, Poisson arrivals at a rate that
    follows `DAY` (linear between hours), the peak hour at `DAY_PEAK_LOAD` of the capacity.
    Returns the arrivals (simulated seconds, prompt tokens, max tokens) and the peak rate."""
    mix = sharegpt_like(20000, seed=seed)
    mean_tokens = sum(length(r.prompt) + r.max_tokens for r in mix) / len(mix)
    peak = DAY_PEAK_LOAD * capacity / mean_tokens
    rng = random.Random(seed)
    out: list[tuple[float, int, int]] = []
    t = 0.0
    i = 0
    while True:  # thinning: candidates at the peak rate, each kept with rate(t) / peak
        t += rng.expovariate(peak)
        if t >= 24 * hour:
            return out, peak
        h = t / hour
        lo = DAY[int(h) % 24]
        share = lo + (DAY[(int(h) + 1) % 24] - lo) * (h - int(h))
        if rng.random() >= share:
            continue
        r = mix[i % len(mix)]
        i += 1
        out.append((t, length(r.prompt), r.max_tokens))


def saturated_capacity(batch: list[tuple[int, int]], **engine: Any) -> float:
    """Total tokens/s of the batch's mix on the simulated GPU, over the steady part of an
    offline run (finishes between 10% and 70% of it: no ramp-up, no draining tail)."""
    from backfill.sim.offline import OfflineRequest

    stats = Simulator(PROFILE, **engine).run_offline(
        OfflineRequest(prompt=p, max_tokens=o, key=("cap", i)) for i, (p, o) in enumerate(batch)
    )
    lo, hi = 0.1 * stats.duration_s, 0.7 * stats.duration_s
    tokens = sum(r.prompt_len + r.num_output for r in stats.finished if lo <= r.finish_time <= hi)
    return tokens / (hi - lo)


@dataclass
class Phase:
    name: str
    rt: list[dict[str, Any]] = field(default_factory=list)  # sim fields + tokens
    rt_errors: int = 0
    rt_error_kinds: dict[str, int] = field(default_factory=dict)  # status or exception: count
    batch: list[tuple[float, int, int]] = field(default_factory=list)  # finish s, tokens, prompt
    deferred: float = 0.0  # long-prompt batch requests waiting at the trace's end (/metrics)
    window: tuple[float, float] = (0.0, 0.0)  # simulated seconds: the trace's start and end
    lag_s: float = 0.0
    limits: list[int] = field(default_factory=list)
    wall_s: float = 0.0

    def error(self, kind: str) -> None:
        self.rt_errors += 1
        self.rt_error_kinds[kind] = self.rt_error_kinds.get(kind, 0) + 1


async def one_rt(
    session: aiohttp.ClientSession, url: str, model: str, i: int, p: int, o: int, phase: Phase
) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": words(f"rt{phase.name}{i}", p)}],
        "max_tokens": o,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                phase.error(f"{resp.status} {(await resp.read())[:120]!r}")
                return
            tail = b""
            async for chunk in resp.content.iter_any():
                tail = (tail + chunk)[-4096:]
    except aiohttp.ClientError as exc:
        phase.error(f"{type(exc).__name__}: {exc}"[:160])
        return
    for line in reversed(tail.split(b"\n")):
        if line.startswith(b"data: {") and b'"usage"' in line:
            event = json.loads(line[6:])
            usage = event["usage"]
            phase.rt.append(
                {**event["sim"], "tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
            )
            return
    phase.error("no usage event at the end of the stream")


async def replay(base_url: str, model: str, items: list[tuple[float, int, int]], speedup: float,
                 phase: Phase) -> None:  # fmt: skip
    url = base_url + "/chat/completions"
    connector = aiohttp.TCPConnector(limit=0)
    headers = {"Authorization": f"Bearer {KEY}"}
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, headers=headers, timeout=timeout) as s:
        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks = []
        for i, (t, p, o) in enumerate(items):
            delay = start + t / speedup - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one_rt(s, url, model, i, p, o, phase)))
        await asyncio.gather(*tasks)


def batch_file(path: Path, batch: list[tuple[int, int]], model: str, tag: str) -> None:
    with path.open("w") as fh:
        for i, (p, o) in enumerate(batch):
            line = {
                "custom_id": f"{tag}-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": model,
                    "messages": [{"role": "user", "content": words(f"b{tag}{i}", p)}],
                    "max_tokens": o,
                },
            }
            fh.write(json.dumps(line) + "\n")


def config(sim: SimProcess, path: Path, *, governor: bool, limit: int) -> Path:
    path.write_text(
        f"""
[models.llama]
url = "{sim.url}"
upstream_name = "{sim.model_name}"
priority = true
governor = {"true" if governor else "false"}
max_concurrency = {limit}
timeout = 3600
"""
    )
    return path


def cancel_and_collect(client: OpenAI, batch_id: str) -> list[tuple[float, int, int]]:
    """Cancel the batch, wait until it ends, and return (simulated finish, total tokens, prompt
    tokens) of every request it finished."""
    client.batches.cancel(batch_id)
    deadline = time.monotonic() + 120
    terminal = ("cancelled", "completed", "failed", "expired")
    while (b := client.batches.retrieve(batch_id)).status not in terminal:
        if time.monotonic() > deadline:
            raise TimeoutError("batch did not cancel")
        time.sleep(0.3)
    out: list[tuple[float, int, int]] = []
    if b.output_file_id:
        for line in client.files.content(b.output_file_id).text.splitlines():
            body = json.loads(line)["response"]["body"]
            usage = body["usage"]
            out.append((body["sim"]["finish_s"], usage["total_tokens"], usage["prompt_tokens"]))
    return out


def run_phase(
    name: str,
    sim: SimProcess,
    work: Path,
    items: list[tuple[float, int, int]],
    batch: list[tuple[int, int]] | None,
    args: argparse.Namespace,
    *,
    governor: bool,
    limit: int,
    extra_env: dict[str, str] | None = None,
) -> Phase:
    phase = Phase(name)
    data = work / f"data-{name}"
    cfg = config(sim, work / f"{name}.toml", governor=governor, limit=limit)
    env = {
        "BACKFILL_CANCEL_GRACE_SECONDS": "0",
        "BACKFILL_REALTIME_RPM": "0",
        "BACKFILL_SCHEDULER_INTERVAL": "0.2",
        "BACKFILL_GOVERNOR_WINDOW_SECONDS": str(args.window),
        **(extra_env or {}),
    }
    wall0 = time.monotonic()
    with BackfillProcess(data, api_keys=[KEY], extra_args=["--config", str(cfg)], env=env) as bf:
        client = OpenAI(base_url=bf.base_url, api_key=KEY, max_retries=2, timeout=120)
        batch_id = None
        if batch is not None:
            path = work / f"batch-{name}.jsonl"
            batch_file(path, batch, "llama", name)
            f = client.files.create(file=path.open("rb"), purpose="batch")
            b = client.batches.create(
                input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            batch_id = b.id
            deadline = time.monotonic() + 120
            while client.batches.retrieve(batch_id).status == "validating":
                if time.monotonic() > deadline:
                    raise TimeoutError("batch stuck in validating")
                time.sleep(0.2)
        stats0 = sim.stats()
        t0 = stats0["sim_time_s"]
        lag0 = stats0["lag_s"]
        asyncio.run(replay(bf.base_url, "llama", items, args.speedup, phase))
        stats1 = sim.stats()
        # the window ends with the trace: after its last arrival the real-time load drains
        # and the governor would give the batch the idle GPU, which is not what is measured
        phase.window = (t0, min(t0 + args.duration, stats1["sim_time_s"]))
        phase.lag_s = stats1["lag_s"] - lag0
        root = bf.base_url.removesuffix("/v1")
        with urllib.request.urlopen(root + "/metrics", timeout=10) as resp:
            metrics = parse(resp.read().decode(), drop_labels=("model",))
        phase.deferred = metrics.get("backfill_batch_deferred", 0.0)
        if batch_id is not None:
            phase.batch.extend(cancel_and_collect(client, batch_id))
    phase.wall_s = time.monotonic() - wall0
    return phase


def summarize(phase: Phase, warmup: float) -> dict[str, float]:
    start, hi = phase.window
    lo = start + warmup
    batch = [(tokens, prompt) for finish, tokens, prompt in phase.batch if lo <= finish <= hi]
    inside = [r for r in phase.rt if lo <= r["arrival_s"] <= hi]
    ttft = Distribution.of([r["ttft_s"] for r in inside])
    tpot = Distribution.of([r["tpot_s"] for r in inside if r["tpot_s"] > 0])
    seconds = hi - lo
    rt_tokens = sum(r["tokens"] for r in phase.rt if lo <= r["finish_s"] <= hi)
    return {
        "n": len(inside),
        "ttft50": ttft.p50 * 1e3,
        "ttft99": ttft.p99 * 1e3,
        "tpot50": tpot.p50 * 1e3,
        "tpot99": tpot.p99 * 1e3,
        "rt_tps": rt_tokens / seconds,
        "batch_tps": sum(tokens for tokens, _ in batch) / seconds,
        "batch_done": len(batch),
        "batch_long": sum(1 for _, prompt in batch if prompt > LONG),
        "seconds": seconds,
    }


def verdict(label: str, s: dict[str, float], a: dict[str, float], idle: float) -> str:
    ttft_r, tpot_r = s["ttft99"] / a["ttft99"], s["tpot99"] / a["tpot99"]
    share = s["batch_tps"] / idle
    met = ttft_r <= 1.10 and tpot_r <= 1.20 and share >= 0.75
    return (
        f"{label}: p99 TTFT {ttft_r:.2f}x (<= 1.10), p99 TPOT {tpot_r:.2f}x (<= 1.20), idle "
        f"used {share:.0%} (>= 75%): " + ("TARGET MET" if met else "TARGET MISSED")
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--speedup", type=float, default=2.0, help="2: see the docstring")
    parser.add_argument("--duration", type=float, default=240.0, help="trace, simulated seconds")
    parser.add_argument("--warmup", type=float, default=60.0, help="simulated seconds")
    parser.add_argument("--early", type=float, default=30.0, help="also measured from here")
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--window", type=float, default=60.0, help="governor window, wall s")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--only", default="abcd", help="phases: a alone, b fixed 256, c governor, d AIMD"
    )
    parser.add_argument("--fixed", type=int, nargs="*", default=[], help="more fixed levels")
    args = parser.parse_args()

    wall0 = time.monotonic()
    mix = sharegpt_like(args.batch, seed=args.seed + 1)
    batch = [(length(r.prompt), r.max_tokens) for r in mix]
    capacity = saturated_capacity(batch)
    short = [(p, o) for p, o in batch if p <= LONG]
    long_share = 1 - len(short) / len(batch)
    items, rate = trace(capacity, args.duration, args.seed)
    print(
        f"GPU: {PROFILE} (simulated), speedup {args.speedup:g}x; saturated capacity on the "
        f"batch mix: {capacity:,.0f} tokens/s (offline, steady part)"
    )
    print(
        f"real-time trace: {len(items)} requests over {args.duration:g} s, mean "
        f"{rate:.1f} req/s (~{LOAD:.0%} of capacity), {BURST:g} s of every {CYCLE:g} s at "
        f"{BURST_X:g}x; batch: {len(batch)} requests; window: after {args.warmup:g} s warm-up"
    )
    phases: dict[str, Phase] = {}
    with tempfile.TemporaryDirectory() as tmp, start_sim(PROFILE, speedup=args.speedup) as sim:
        work = Path(tmp)
        plan: dict[str, tuple[list[tuple[int, int]] | None, bool, int]] = {
            "a": (None, False, 256),
            "b": (batch, False, 256),
            "c": (batch, True, 1024),
            "d": (batch, True, 1024),
        }
        for n in args.fixed:
            plan[f"f{n}"] = (batch, False, n)
        for name in [*args.only, *(f"f{n}" for n in args.fixed)]:
            extra: dict[str, str] = {}
            if name == "d":  # AIMD: its absolute targets are the budget x (a)'s p99s, in wall ms
                if "a" not in phases:
                    raise SystemExit("phase d (AIMD) needs phase a first")
                a = summarize(phases["a"], args.warmup)
                extra = {
                    "BACKFILL_GOVERNOR_POLICY": "aimd",
                    "BACKFILL_GOVERNOR_AIMD_TTFT_MS": f"{1.10 * a['ttft99'] / args.speedup:.3f}",
                    "BACKFILL_GOVERNOR_AIMD_TPOT_MS": f"{1.20 * a['tpot99'] / args.speedup:.3f}",
                }
            work_batch, governor, limit = plan[name]
            phases[name] = run_phase(
                name,
                sim,
                work,
                items,
                work_batch,
                args,
                governor=governor,
                limit=limit,
                extra_env=extra,
            )
            p, s = phases[name], summarize(phases[name], args.warmup)
            print(
                f"  ({name}) done in {p.wall_s:.0f} s wall, sim lag {p.lag_s:.2f} s, {s['n']} rt "
                f"requests in window, {p.rt_errors} rt errors, {s['batch_done']} batch requests "
                "in window",
                flush=True,
            )
            if s["batch_done"]:
                long_done = s["batch_long"] / s["batch_done"]
                print(
                    f"      batch prompts over {LONG} tokens: {long_done:.1%} of those in window"
                    f" (input: {long_share:.1%}); {p.deferred:.0f} deferred "
                    "at the trace's end",
                    flush=True,
                )
            for kind, count in sorted(phases[name].rt_error_kinds.items()):
                print(f"      rt error x{count}: {kind}", flush=True)
    rows = {name: summarize(p, args.warmup) for name, p in phases.items()}
    labels = {
        "a": "(a) real-time alone",
        "b": "(b) + batch, fixed 256",
        "c": "(c) + batch, governor",
        "d": "(d) + batch, AIMD",
        **{f"f{n}": f"+ batch, fixed {n}" for n in args.fixed},
    }
    idle = capacity - rows["a"]["rt_tps"] if "a" in rows else float("nan")
    print()
    print(
        f"{'policy':<26}{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}{'TPOT p99':>10}"
        f"{'rt tok/s':>10}{'batch tok/s':>12}{'idle used':>10}"
    )
    for name, s in rows.items():
        print(
            f"{labels[name]:<26}{s['ttft50']:>8.1f}ms{s['ttft99']:>8.1f}ms{s['tpot50']:>8.1f}ms"
            f"{s['tpot99']:>8.1f}ms{s['rt_tps']:>10,.0f}{s['batch_tps']:>12,.0f}"
            f"{s['batch_tps'] / idle:>10.0%}"
        )
    if "a" in rows:
        a = rows["a"]
        print(f"idle capacity = {capacity:,.0f} - {a['rt_tps']:,.0f} = {idle:,.0f} tokens/s")
        # while real time is active the governor defers long prompts: the work done in the
        # window is mostly short-prompt work, whose own saturated throughput is lower (so the
        # share above, against the whole mix, understates it)
        print(
            f"saturated capacity on the batch's prompts of at most {LONG} tokens: "
            f"{saturated_capacity(short):,.0f} tokens/s"
        )
        for name in rows:
            if name != "a":
                print(verdict(labels[name], rows[name], a, idle))
        if "c" in rows and "d" in rows:
            c, d = rows["c"], rows["d"]
            better = c["ttft99"] <= d["ttft99"] and c["tpot99"] <= d["tpot99"]
            print(
                f"governor / AIMD idle share: {c['batch_tps'] / d['batch_tps']:.2f}x (target >= "
                f"1.3x at equal or better p99; p99 {'equal or better' if better else 'worse'})"
            )
        print(
            "the oracle frontier on this trace: `bench/harvest_sim.py --seed "
            f"{args.seed}` (simulated time; no HTTP run can set a limit by the burst schedule)"
        )
        # before the first burst (45-60 s) the governor has seen no peak and runs cautiously
        early = {name: summarize(p, args.early) for name, p in phases.items()}
        idle_early = capacity - early["a"]["rt_tps"]
        print(f"measured from {args.early:g} s instead (the governor's cold start included):")
        for name in early:
            if name != "a":
                print("  " + verdict(labels[name], early[name], early["a"], idle_early))
    print(f"total wall time {time.monotonic() - wall0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
