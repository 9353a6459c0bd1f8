"""Real-time TTFT beside a batch on an engine without metrics that runs few requests at once.

    python bench/protect_no_metrics.py [--slots 1] [--limit 16] [--speedup 2] [--duration 120]
                                       [--rate 0.5] [--only abc]

One `backfill sim --no-metrics --max-num-seqs SLOTS` (its `/metrics` a 404; SLOTS sequences at
a time, the others queued in arrival order, as llama-cpp-python's server (one) or llama-server
with `-np SLOTS` run them) serves, one after the other, through a fresh `backfill serve` each:

  (a) real-time alone: open-loop Poisson arrivals (`--rate` per simulated second, short
      prompts, 32 tokens out) streamed through backfill's gateway;
  (b) the same + a batch at `max_concurrency = LIMIT` with `governor = false` (what backfill
      did by default before for an upstream without metrics);
  (c) the same + the same batch with the model's default (no `governor` key): the governor,
      dormant until the first real-time request, then on the gateway's latencies alone.

TTFT and TPOT are the simulator's exact figures (the `sim` field of each answer), over the
real-time requests that arrived after `--warmup` simulated seconds; the batch's tokens/s count
the batch requests that finished in the same window (the batch is cancelled at the trace's
end). The (c) line also gives the batch limit backfill's `/metrics` showed while real time
ran (sampled every 0.5 s wall) and the batch requests shed. Ratios are against (a).

On an engine that runs one request at a time a real-time request waits for the batch requests
ahead of it: behind `LIMIT` of them without a governor, behind the one the governor's floor
(`BACKFILL_GOVERNOR_MIN_LIMIT`, 1) keeps in flight with it. Wall-clock hiccups land `speedup`
times larger in simulated time, as in `bench/harvest.py`, and so does the governor's reaction:
it ticks every 100 ms of wall time, `speedup` x 100 ms simulated (at speedup 5 a failed probe
of a higher batch level cost the real-time requests queued meanwhile up to ~1 simulated
second on two slots; hence the default of 2).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent))

from backfill.sim.metrics import parse
from backfill.sim.offline import Distribution
from backfill.sim.process import SimProcess, start_sim
from backfill.testing.server import BackfillProcess
from harvest import KEY, PROFILE, Phase, batch_file, cancel_and_collect, replay

RT_PROMPT, RT_OUT = 64, 32  # tokens of each real-time request
BATCH_PROMPT, BATCH_OUT = 200, 128  # tokens of each batch request


def trace(rate: float, duration: float, seed: int) -> list[tuple[float, int, int]]:
    """Poisson arrivals (simulated seconds, prompt tokens, max tokens)."""
    rng = random.Random(seed)
    out: list[tuple[float, int, int]] = []
    t = rng.expovariate(rate)
    while t < duration:
        out.append((t, RT_PROMPT, RT_OUT))
        t += rng.expovariate(rate)
    return out


def config(sim: SimProcess, path: Path, *, governor: bool | None, limit: int) -> Path:
    line = "" if governor is None else f"governor = {'true' if governor else 'false'}\n"
    path.write_text(
        f'[models.llama]\nurl = "{sim.url}"\nupstream_name = "{sim.model_name}"\n'
        f"max_concurrency = {limit}\ntimeout = 3600\n{line}"
    )
    return path


def sample_limits(root: str, stop: threading.Event, out: list[int]) -> None:
    """backfill's `backfill_batch_limit` every 0.5 s until `stop`."""
    while not stop.wait(0.5):
        try:
            with urllib.request.urlopen(root + "/metrics", timeout=5) as resp:
                metrics = parse(resp.read().decode(), drop_labels=("model",))
        except OSError:
            continue
        if "backfill_batch_limit" in metrics:
            out.append(int(metrics["backfill_batch_limit"]))


def run_phase(
    name: str,
    sim: SimProcess,
    work: Path,
    items: list[tuple[float, int, int]],
    batch: int,
    args: argparse.Namespace,
    *,
    governor: bool | None,
) -> tuple[Phase, float]:
    """One phase; returns it and the batch requests shed (from backfill's /metrics)."""
    phase = Phase(name)
    cfg = config(sim, work / f"{name}.toml", governor=governor, limit=args.limit)
    env = {"BACKFILL_CANCEL_GRACE_SECONDS": "0", "BACKFILL_REALTIME_RPM": "0"}
    wall0 = time.monotonic()
    shed = 0.0
    args_ = ["--config", str(cfg)]
    with BackfillProcess(work / f"data-{name}", api_keys=[KEY], extra_args=args_, env=env) as bf:
        root = bf.base_url.removesuffix("/v1")
        client = OpenAI(base_url=bf.base_url, api_key=KEY, max_retries=2, timeout=120)
        batch_id = None
        if batch:
            path = work / f"batch-{name}.jsonl"
            batch_file(path, [(BATCH_PROMPT, BATCH_OUT)] * batch, "llama", name)
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
            time.sleep(2.0)  # the batch at its limit before real time starts
        stats0 = sim.stats()
        t0 = stats0["sim_time_s"]
        stop = threading.Event()
        sampler = threading.Thread(target=sample_limits, args=(root, stop, phase.limits))
        sampler.start()
        try:
            asyncio.run(replay(bf.base_url, "llama", items, args.speedup, phase))
        finally:
            stop.set()
            sampler.join()
        stats1 = sim.stats()
        phase.window = (t0, min(t0 + args.duration, stats1["sim_time_s"]))
        phase.lag_s = stats1["lag_s"] - stats0["lag_s"]
        with urllib.request.urlopen(root + "/metrics", timeout=10) as resp:
            shed = parse(resp.read().decode(), drop_labels=("model",)).get(
                "backfill_batch_shed_total", 0.0
            )
        if batch_id is not None:
            phase.batch.extend(cancel_and_collect(client, batch_id))
    phase.wall_s = time.monotonic() - wall0
    return phase, shed


def summarize(phase: Phase, warmup: float) -> dict[str, float]:
    start, hi = phase.window
    lo = start + warmup
    inside = [r for r in phase.rt if lo <= r["arrival_s"] <= hi]
    ttft = Distribution.of([r["ttft_s"] for r in inside])
    tpot = Distribution.of([r["tpot_s"] for r in inside if r["tpot_s"] > 0])
    batch = sum(tokens for finish, tokens, _ in phase.batch if lo <= finish <= hi)
    return {
        "n": len(inside),
        "ttft50": ttft.p50 * 1e3,
        "ttft99": ttft.p99 * 1e3,
        "tpot50": tpot.p50 * 1e3,
        "batch_tps": batch / max(1e-9, hi - lo),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slots", type=int, default=1, help="sequences the engine runs at once")
    parser.add_argument("--limit", type=int, default=16, help="the batch's max_concurrency")
    parser.add_argument("--speedup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=120.0, help="trace, simulated seconds")
    parser.add_argument("--warmup", type=float, default=10.0, help="simulated seconds")
    parser.add_argument("--rate", type=float, default=0.5, help="real-time arrivals per sim s")
    parser.add_argument("--batch", type=int, default=5000, help="batch requests (cancelled)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--only", default="abc", help="phases to run (default abc)")
    args = parser.parse_args()

    wall0 = time.monotonic()
    items = trace(args.rate, args.duration, args.seed)
    print(
        f"engine: {PROFILE} simulated, {args.slots} sequence(s) at a time, no /metrics, "
        f"speedup {args.speedup:g}x; real time: {len(items)} streamed requests over "
        f"{args.duration:g} s ({RT_PROMPT} + {RT_OUT} tokens); batch: {BATCH_PROMPT} + "
        f"{BATCH_OUT} tokens each, max_concurrency {args.limit}"
    )
    plan: dict[str, tuple[str, int, bool | None]] = {
        "a": ("(a) real-time alone", 0, False),
        "b": ("(b) + batch, governor=false", args.batch, False),
        "c": ("(c) + batch, default", args.batch, None),
    }
    rows: dict[str, dict[str, float]] = {}
    with (
        tempfile.TemporaryDirectory() as tmp,
        start_sim(PROFILE, speedup=args.speedup, max_num_seqs=args.slots, metrics=False) as sim,
    ):
        for name in args.only:
            label, batch, governor = plan[name]
            phase, shed = run_phase(name, sim, Path(tmp), items, batch, args, governor=governor)
            rows[name] = {**summarize(phase, args.warmup), "shed": shed}
            limits = sorted(phase.limits)
            rows[name]["limit50"] = limits[len(limits) // 2] if limits else float("nan")
            rows[name]["limit_max"] = limits[-1] if limits else float("nan")
            print(
                f"  {label}: {phase.wall_s:.0f} s wall, {rows[name]['n']:.0f} rt requests in "
                f"window, {phase.rt_errors} rt errors, lag {phase.lag_s:.2f} s",
                flush=True,
            )
            for kind, count in sorted(phase.rt_error_kinds.items()):
                print(f"      rt error x{count}: {kind}", flush=True)
    print()
    print(
        f"{'':<30}{'TTFT p50':>10}{'TTFT p99':>10}{'p50 x':>8}{'p99 x':>8}{'TPOT p50':>10}"
        f"{'batch tok/s':>12}{'limit p50/max':>15}{'shed':>7}"
    )
    a = rows.get("a")
    for name, s in rows.items():
        x50 = s["ttft50"] / a["ttft50"] if a else float("nan")
        x99 = s["ttft99"] / a["ttft99"] if a else float("nan")
        seen = f"{s['limit50']:.0f}/{s['limit_max']:.0f}" if name != "a" else "-"
        print(
            f"{plan[name][0]:<30}{s['ttft50']:>8.0f}ms{s['ttft99']:>8.0f}ms{x50:>7.1f}x"
            f"{x99:>7.1f}x{s['tpot50']:>8.1f}ms{s['batch_tps']:>12,.0f}{seen:>15}"
            f"{s['shed']:>7.0f}"
        )
    print(f"total wall time {time.monotonic() - wall0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
