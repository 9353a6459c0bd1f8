"""Prefix-aware planning and identical requests run once, on `backfill sim` (its prefix cache),
through a real `backfill serve`, at equal concurrency.

Phases (each a fresh simulator and a fresh serve, so no cache carries over):
- shared: a shuffled workload over `--prefixes` shared prompts of 1-2k tokens, each request
  the shared prompt plus a short question of its own; in file order (`BACKFILL_PLAN_PREFIXES`
  false), planned (the default), and the oracle (the file sorted by prefix, sent in file
  order): makespan and the prefix-cache hit rate of each; with `--hot both` (the default)
  planned twice, hot groups off (`hot_groups = false`: first come first served in the
  window, no warm-up) and on, for the before/after of `dispatch/hot_groups.py` in one run;
- unique: the same sizes without any shared prefix, file order vs planned (planning must not
  slow a workload it cannot help);
- dup: the shared workload with `--dup` of the lines copies of others (temperature 0), dedup
  off vs on: requests the simulator actually answered, and the makespan.

The makespan is in simulated seconds: from the first request's arrival at the engine to the
last one's finish (the `sim` object of each answer). The sim KV cache is set small enough
(`--gpu-blocks`) that the shared prompts do not all fit at once, as with a bigger model on
the same GPU; otherwise every order hits.

Run: `.venv/bin/python bench/prefix.py` (20,000 requests per phase; `--requests` smaller
while developing). Prints each figure and its ratio against the baseline of the same run.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from openai import OpenAI

from backfill.sim.process import SimProcess, start_sim
from backfill.testing.server import BackfillProcess

PROFILE = "llama-3.1-8b-h100"
KEY = "sk-bench-prefix"
MODEL = "llama"


@dataclass
class Result:
    name: str
    lines: int
    makespan_s: float  # simulated
    hit_rate: float
    answered: int  # requests the engine answered
    wall_s: float


def words(rng: random.Random, n: int) -> str:
    """`n` one-letter words (one token each for the simulator; 2 bytes each in the file)."""
    return " ".join(rng.choices(string.ascii_lowercase, k=n))


def shared_workload(n: int, prefixes: int, seed: int) -> list[tuple[int, dict[str, object]]]:
    """(prefix index, body) of `n` requests over `prefixes` shared prompts of 1-2k tokens."""
    rng = random.Random(seed)
    heads = [words(rng, rng.randint(1000, 2000)) for _ in range(prefixes)]
    out: list[tuple[int, dict[str, object]]] = []
    for _ in range(n):
        k = rng.randrange(prefixes)
        out.append((k, chat(heads[k], words(rng, rng.randint(20, 60)), rng.randint(16, 128))))
    return out


def unique_workload(n: int, seed: int) -> list[tuple[int, dict[str, object]]]:
    rng = random.Random(seed)
    return [
        (i, chat(words(rng, rng.randint(1000, 2000)), words(rng, 40), rng.randint(16, 128)))
        for i in range(n)
    ]


def chat(system: str, question: str, max_tokens: int) -> dict[str, object]:
    return {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


def with_duplicates(
    work: list[tuple[int, dict[str, object]]], share: float, seed: int
) -> list[tuple[int, dict[str, object]]]:
    """`share` of the lines replaced by copies of other lines, shuffled."""
    rng = random.Random(seed)
    n = len(work)
    originals = work[: n - int(n * share)]
    copies = [rng.choice(originals) for _ in range(n - len(originals))]
    out = originals + copies
    rng.shuffle(out)
    return out


def write_batch(path: Path, work: list[tuple[int, dict[str, object]]]) -> None:
    with path.open("w") as fh:
        for i, (_, body) in enumerate(work):
            line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions"}
            fh.write(json.dumps({**line, "body": body}, separators=(",", ":")) + "\n")


def config(
    sim: SimProcess, path: Path, concurrency: int, dedup: str, hot: bool, warmup: float
) -> Path:
    path.write_text(
        f"""
[models.{MODEL}]
url = "{sim.url}"
upstream_name = "{sim.model_name}"
governor = false
max_concurrency = {concurrency}
timeout = 3600
dedup = "{dedup}"
hot_groups = {"true" if hot else "false"}
group_warmup = {warmup}
"""
    )
    return path


def run_phase(
    name: str,
    work: list[tuple[int, dict[str, object]]],
    args: argparse.Namespace,
    tmp: Path,
    *,
    planned: bool,
    dedup: str = "off",
    hot: bool = True,
) -> Result:
    wall0 = time.monotonic()
    with start_sim(
        PROFILE, speedup=args.speedup, num_gpu_blocks=args.gpu_blocks, model_name=MODEL
    ) as sim:
        path = tmp / f"{name}.jsonl"
        write_batch(path, work)
        cfg = config(sim, tmp / f"{name}.toml", args.concurrency, dedup, hot, args.warmup)
        env = {
            "BACKFILL_PLAN_PREFIXES": "true" if planned else "false",
            "BACKFILL_SCHEDULER_INTERVAL": "0.2",
            "BACKFILL_REALTIME_RPM": "0",
        }
        data = tmp / f"data-{name}"
        with BackfillProcess(
            data, api_keys=[KEY], extra_args=["--config", str(cfg)], env=env
        ) as bf:
            client = OpenAI(base_url=bf.base_url, api_key=KEY, max_retries=2, timeout=300)
            f = client.files.create(file=path.open("rb"), purpose="batch")
            b = client.batches.create(
                input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            deadline = time.monotonic() + args.timeout
            while (b := client.batches.retrieve(b.id)).status not in (
                "completed",
                "failed",
                "expired",
                "cancelled",
            ):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name}: batch not done in {args.timeout} s")
                time.sleep(0.5)
            if b.status != "completed" or b.output_file_id is None:
                raise RuntimeError(f"{name}: batch ended {b.status}: {b.errors}")
            arrivals, finishes, ids = [], [], []
            for line in client.files.content(b.output_file_id).text.splitlines():
                row = json.loads(line)
                ids.append(row["custom_id"])
                s = row["response"]["body"]["sim"]
                arrivals.append(s["arrival_s"])
                finishes.append(s["finish_s"])
            if ids != [f"r{i}" for i in range(len(work))]:
                raise RuntimeError(f"{name}: output lines missing or out of input order")
            stats = sim.stats()
    hit = stats["prefix_cache_hits"] / max(1, stats["prefix_cache_queries"])
    result = Result(
        name,
        len(work),
        max(finishes) - min(arrivals),
        hit,
        int(stats["requests_finished"]),
        time.monotonic() - wall0,
    )
    print(
        f"  {name:<22} makespan {result.makespan_s:8.1f} sim s   prefix hits {hit:6.1%}   "
        f"engine answered {result.answered:6d} of {len(work)} lines   "
        f"({result.wall_s:.0f} s wall)",
        flush=True,
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000, help="lines per workload")
    parser.add_argument("--prefixes", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=128, help="max_concurrency, all runs")
    parser.add_argument("--gpu-blocks", type=int, default=4096, help="sim KV blocks of 16")
    parser.add_argument("--speedup", type=float, default=20.0)
    parser.add_argument("--dup", type=float, default=0.30, help="share of duplicate lines")
    parser.add_argument("--only", default="sud", help="s(hared) u(nique) d(uplicates)")
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument(
        "--hot",
        choices=("on", "off", "both"),
        default="both",
        help="hot prefix groups in the window (shared phase: 'both' runs planned off and on)",
    )
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="group_warmup seconds with hot groups on (0 off)"
    )
    args = parser.parse_args()
    print(
        f"{PROFILE} (simulated, {args.gpu_blocks} KV blocks of 16 tokens, speedup "
        f"{args.speedup:g}x), max_concurrency {args.concurrency}, {args.requests} requests "
        "per workload",
        flush=True,
    )
    wall0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if "s" in args.only:
            work = shared_workload(args.requests, args.prefixes, args.seed)
            print(f"shared: {args.prefixes} prefixes of 1-2k tokens, shuffled", flush=True)
            base = run_phase("shared, file order", work, args, tmp, planned=False)
            cold = None
            if args.hot in ("off", "both"):
                cold = run_phase(
                    "shared, planned, hot off", work, args, tmp, planned=True, hot=False
                )
            plan = cold
            if args.hot in ("on", "both"):
                plan = run_phase("shared, planned", work, args, tmp, planned=True)
            assert plan is not None
            oracle_work = sorted(work, key=lambda item: item[0])
            oracle = run_phase("shared, oracle order", oracle_work, args, tmp, planned=False)
            print(
                f"  planned vs file order: {base.makespan_s / plan.makespan_s:.2f}x faster "
                f"(target >= 1.5x); oracle {base.makespan_s / oracle.makespan_s:.2f}x; hit "
                f"rates file {base.hit_rate:.1%}, planned {plan.hit_rate:.1%}, oracle "
                f"{oracle.hit_rate:.1%} (planned/oracle {plan.hit_rate / oracle.hit_rate:.2f})",
                flush=True,
            )
            if cold is not None and plan is not cold:
                print(
                    f"  hot groups on vs off (planned both): makespan "
                    f"{cold.makespan_s / plan.makespan_s:.3f}x faster, hit rate "
                    f"{plan.hit_rate:.1%} vs {cold.hit_rate:.1%}; vs file order "
                    f"{base.makespan_s / plan.makespan_s:.2f}x vs "
                    f"{base.makespan_s / cold.makespan_s:.2f}x",
                    flush=True,
                )
        if "u" in args.only:
            work = unique_workload(args.requests, args.seed + 1)
            print("unique: no shared prefixes", flush=True)
            base = run_phase("unique, file order", work, args, tmp, planned=False)
            plan = run_phase("unique, planned", work, args, tmp, planned=True)
            slower = plan.makespan_s / base.makespan_s - 1
            print(
                f"  planned vs file order: {plan.makespan_s / base.makespan_s:.3f}x the "
                f"makespan ({slower:+.1%}; target <= +2%)",
                flush=True,
            )
        if "d" in args.only:
            work = with_duplicates(
                shared_workload(args.requests, args.prefixes, args.seed + 2),
                args.dup,
                args.seed + 3,
            )
            distinct = len({json.dumps(b, sort_keys=True) for _, b in work})
            print(
                f"dup: {args.dup:.0%} of lines copies of others ({distinct} distinct bodies), "
                "planned both",
                flush=True,
            )
            base = run_phase("dup, dedup off", work, args, tmp, planned=True, dedup="off")
            on = run_phase("dup, dedup on", work, args, tmp, planned=True, dedup="deterministic")
            print(
                f"  requests sent: {on.answered} vs {base.answered} "
                f"({on.answered / base.answered:.2f}x; distinct bodies {distinct}); makespan "
                f"{base.makespan_s / on.makespan_s:.2f}x faster",
                flush=True,
            )
    print(f"total wall time {time.monotonic() - wall0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
