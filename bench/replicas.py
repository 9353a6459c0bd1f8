"""Replica routing: affinity vs round-robin (and least-loaded) on 4 simulated replicas.

    python bench/replicas.py [--requests 3000] [--prefixes 50] [--speedup 2] [--gpu-blocks 3000]

Four `backfill sim` processes (llama-3.1-8b on one H100 each, vLLM v1 scheduler with its prefix
cache) serve one model through one `backfill serve` (`urls = [4 sims]`, governor off, a fixed
`--concurrency` window, so only the routing differs). The workload: `--prefixes` shared
prefixes (a system prompt of 1,000-2,000 tokens each) and `--requests` requests, each a prefix
plus a unique question of ~30 tokens and `--max-tokens` of output, in shuffled order (no
prefix-aware planning helps here: every policy sees the same file). Per routing policy, with
fresh simulators (empty caches) each time, it prints:

- the batch's completion time, wall seconds from create to completed (the simulators run at
  `--speedup` simulated seconds per wall second);
- GPU-seconds: the simulated busy time summed over the replicas (wall-clock noise of this
  shared machine does not enter it), and the busiest replica's;
- the prefix-cache hit rate per replica and overall, from each simulator's `/metrics`
  (`vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total`, in tokens);
- the ratios of round-robin (and least-loaded) to affinity.

`--gpu-blocks` sizes each replica's KV cache (blocks of 16 tokens). The default, 3,000 blocks
(48k tokens), holds a quarter of the prefixes with room for the running requests but not all
50 (about 75k tokens): the usual case of a real deployment, whose prefixes outnumber what one
replica's cache holds. With a cache that holds every prefix (`--gpu-blocks 0`: the profile's,
about 30k blocks) round-robin only pays each prefix's first miss once per replica, and the gap
shrinks to those cold misses.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from openai import OpenAI

from backfill.sim.process import SimProcess, start_sim
from backfill.testing.server import BackfillProcess

PROFILE = "llama-3.1-8b-h100"
KEY = "sk-replicas"
POLICIES = ("affinity", "round_robin", "least_loaded")
HITS, QUERIES = "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"


def workload(path: Path, requests: int, prefixes: int, max_tokens: int, seed: int) -> int:
    """Write the batch file; returns its prompt tokens (about: the sim's words)."""
    rng = random.Random(seed)
    heads = [
        " ".join([f"p{p}"] + [f"w{rng.randrange(1000)}" for _ in range(rng.randint(1000, 2000))])
        for p in range(prefixes)
    ]
    lines = []
    tokens = 0
    for i in range(requests):
        head = heads[rng.randrange(prefixes)]
        question = " ".join([f"q{i}"] + [f"x{rng.randrange(1000)}" for _ in range(29)])
        tokens += len(head.split()) + 30
        lines.append(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "llama",
                    "messages": [
                        {"role": "system", "content": head},
                        {"role": "user", "content": question},
                    ],
                    "max_tokens": max_tokens,
                },
            }
        )
    rng.shuffle(lines)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return tokens


def config(
    path: Path,
    sims: list[SimProcess],
    routing: str,
    concurrency: int,
    hot: bool = True,
    warmup: float = 2.0,
) -> Path:
    urls = ", ".join(f'"{s.url}"' for s in sims)
    path.write_text(
        f"""
[models.llama]
urls = [{urls}]
upstream_name = "{sims[0].model_name}"
routing = "{routing}"
governor = false
max_concurrency = {concurrency}
timeout = 3600
hot_groups = {"true" if hot else "false"}
group_warmup = {warmup}
"""
    )
    return path


def run(
    routing: str, work: Path, batch: Path, args: argparse.Namespace, hot: bool = True
) -> dict[str, object]:
    blocks = args.gpu_blocks or None
    with ExitStack() as stack:
        sims = [
            stack.enter_context(start_sim(PROFILE, speedup=args.speedup, num_gpu_blocks=blocks))
            for _ in range(args.replicas)
        ]
        name = f"{routing}-{'hot' if hot else 'fifo'}"
        cfg = config(work / f"{name}.toml", sims, routing, args.concurrency, hot, args.warmup)
        env = {
            "BACKFILL_SCHEDULER_INTERVAL": "0.2",
            "BACKFILL_SHARD_SIZE": "500",
            "BACKFILL_PLAN_PREFIXES": "true" if args.plan else "false",
        }
        bf = stack.enter_context(
            BackfillProcess(
                work / f"data-{name}", api_keys=[KEY], extra_args=["--config", str(cfg)], env=env
            )
        )  # entering the context starts it
        client = OpenAI(base_url=bf.base_url, api_key=KEY, max_retries=2, timeout=120)
        busy0 = [s.stats()["busy_s"] for s in sims]
        f = client.files.create(file=batch.open("rb"), purpose="batch")
        t0 = time.monotonic()
        b = client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        deadline = t0 + args.timeout
        while (b := client.batches.retrieve(b.id)).status not in ("completed", "failed"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{routing}: batch not done after {args.timeout:g} s")
            time.sleep(0.2)
        wall = time.monotonic() - t0
        counts = b.request_counts
        assert b.status == "completed" and counts is not None and counts.failed == 0, b
        stats = [s.stats() for s in sims]
        figures = [s.metrics() for s in sims]
    closing = [line for line in bf.logs().splitlines() if "replicas at close" in line]
    spilled = sum(int(n) for n in re.findall(r"'spilled': (\d+)", closing[-1])) if closing else -1
    busy = [st["busy_s"] - b0 for st, b0 in zip(stats, busy0, strict=True)]
    hits = [m.get(HITS, 0.0) for m in figures]
    queries = [m.get(QUERIES, 0.0) for m in figures]
    return {
        "wall": wall,
        "busy": busy,
        "hit_rates": [h / q if q else 0.0 for h, q in zip(hits, queries, strict=True)],
        "hit_rate": sum(hits) / sum(queries) if sum(queries) else 0.0,
        "requests": [st["requests_finished"] for st in stats],
        "lag": max(st["lag_s"] for st in stats),
        "spilled": spilled,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--prefixes", type=int, default=50)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=64, help="the model's window")
    parser.add_argument("--speedup", type=float, default=2.0, help="simulated s per wall s")
    parser.add_argument("--gpu-blocks", type=int, default=3000, help="0: the profile's")
    parser.add_argument("--policies", default="affinity,round_robin", help="comma-separated")
    parser.add_argument(
        "--plan", action="store_true", help="prefix-aware planning on (default: file order)"
    )
    parser.add_argument(
        "--hot",
        choices=("on", "off", "both"),
        default="on",
        help="hot prefix groups in the window (needs --plan); 'both': each policy off, then on",
    )
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="group_warmup seconds with hot groups (0 off)"
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="per batch, wall s")
    parser.add_argument("--seed", type=int, default=16)
    args = parser.parse_args()
    policies = [p for p in args.policies.split(",") if p]
    for p in policies:
        if p not in POLICIES:
            parser.error(f"unknown policy {p!r} (known: {', '.join(POLICIES)})")

    wall0 = time.monotonic()
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        batch = work / "batch.jsonl"
        tokens = workload(batch, args.requests, args.prefixes, args.max_tokens, args.seed)
        print(
            f"{args.replicas} x {PROFILE} (simulated, speedup {args.speedup:g}x, "
            f"{args.gpu_blocks or 'profile'} KV blocks each); {args.requests} requests over "
            f"{args.prefixes} prefixes of 1-2k tokens, {tokens:,} prompt tokens, shuffled; "
            f"window {args.concurrency}, governor off, "
            f"{'prefix-planned order' if args.plan else 'file order (planning off)'}",
            flush=True,
        )
        modes = {"on": [True], "off": [False], "both": [False, True]}[args.hot]
        for routing in policies:
            for hot in modes:
                label = f"{routing}{'' if args.hot != 'both' else (', hot' if hot else ', fifo')}"
                r = results[label] = run(routing, work, batch, args, hot)
                busy = r["busy"]
                assert isinstance(busy, list)
                rates = r["hit_rates"]
                assert isinstance(rates, list)
                print(
                    f"  {label:<19} done in {r['wall']:.1f} s wall; GPU-s {sum(busy):.1f} "
                    f"(busiest {max(busy):.1f}); hit rate {r['hit_rate']:.1%} overall, per "
                    "replica "
                    + " ".join(f"{x:.1%}" for x in rates)
                    + f"; requests per replica {r['requests']}, spilled {r['spilled']}; "
                    f"max sim lag {r['lag']:.2f} s",
                    flush=True,
                )

    def ratio(label: str, a: dict[str, object], r: dict[str, object]) -> None:
        wall_a, wall_r = a["wall"], r["wall"]
        busy_a, busy_r = a["busy"], r["busy"]
        assert isinstance(wall_a, float) and isinstance(wall_r, float)
        assert isinstance(busy_a, list) and isinstance(busy_r, list)
        print(
            f"{label}: completion time {wall_r / wall_a:.2f}x, GPU-seconds "
            f"{sum(busy_r) / sum(busy_a):.2f}x, hit rate {r['hit_rate']:.1%} vs "
            f"{a['hit_rate']:.1%}"
        )

    suffixes = [""] if args.hot != "both" else [", fifo", ", hot"]
    for suffix in suffixes:
        base = results.get(f"affinity{suffix}")
        if base is None:
            continue
        for routing in policies:
            if routing != "affinity":
                ratio(f"{routing}{suffix} / affinity{suffix}", base, results[routing + suffix])
    if args.hot == "both":
        for routing in policies:
            ratio(f"{routing}: fifo / hot", results[f"{routing}, hot"], results[f"{routing}, fifo"])
    print(f"total wall time {time.monotonic() - wall0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
