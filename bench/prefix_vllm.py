"""Prefix-aware planning on a real engine: vLLM on CPU (SmolLM2-135M-Instruct) with prefix
caching, through a real `backfill serve`, at equal concurrency; the hit rate is vLLM's own.

    .venv/bin/python bench/prefix_vllm.py [--prefixes 10] [--questions 8] [--oracle]

The real-engine counterpart of `bench/prefix.py`'s shared phase. The workload: `--prefixes`
reports of `--prefix-min`..`--prefix-max` tokens of English-like prose (sentences drawn from
fixed word lists by `--seed`: deterministic, nothing downloaded), each the system message of
`--questions` requests that add a short question of their own (`--max-tokens` out, temperature
0), the lines shuffled. Phases, each with a fresh vLLM (so no cached prefix carries over) and a
fresh serve:
- file order: `BACKFILL_PLAN_PREFIXES=false`, the requests go out in the shuffled file order;
- planned: the default (`domain/planning.py` orders them by prefix, the window's hot groups
  and warm-up lean them together);
- oracle (`--oracle`): the file sorted by prefix, sent with planning off: the best order.

For each: the wall makespan of the batch (from `batches.create` to the poll that sees it
`completed`, so it includes backfill's validation, planning and finalization), and vLLM's
prefix-cache hit rate over the phase: the deltas of `vllm:prefix_cache_hits_total` over
`vllm:prefix_cache_queries_total` (prompt tokens found cached over prompt tokens looked up);
"prefilled" is their difference, the prompt tokens vLLM computed.

Order only matters when the cache cannot hold every prefix: vLLM's KV cache is set to
`--kv-tokens` (`--num-gpu-blocks-override` blocks of `--block-size`; `VLLM_CPU_KVCACHE_SPACE`
counts whole GiB, ~23k tokens of this model's float32 KV at the least, more than the whole
workload), about three of the reports. backfill's model has the governor off and
`max_concurrency = --concurrency`, as in `bench/prefix.py`. vLLM runs pinned to CPU 0
(`VllmProcess`), where SmolLM2 prefills some hundreds of tokens per second: an uncached report
costs over a second, a cached one a fraction. The defaults take about 3.5 minutes (each vLLM
start ~40 s), 4.5 with `--oracle`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from openai import OpenAI

from backfill.engines.smollm2 import prepare
from backfill.testing.server import BackfillProcess
from backfill.testing.vllm import VllmProcess, vllm_python, vllm_venv

KEY = "sk-bench-prefix-vllm"
MODEL = "smol"
HITS = "vllm:prefix_cache_hits_total"
QUERIES = "vllm:prefix_cache_queries_total"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
#: SmolLM2's tokenizer on this prose: tokens per word (words plus punctuation), measured
TOKENS_PER_WORD = 1.15

TOPICS = [
    "the old harbour",
    "the mountain railway",
    "the village school",
    "the river bridge",
    "the city library",
    "the apple orchard",
    "the coastal lighthouse",
    "the night market",
    "the weather station",
    "the community garden",
    "the copper mine",
    "the island ferry",
    "the glass factory",
    "the forest cabin",
    "the town museum",
    "the desert observatory",
]
PEOPLE = [
    "the mayor",
    "a young engineer",
    "the head teacher",
    "an old fisherman",
    "the night guard",
    "a visiting scientist",
    "the baker",
    "two students",
    "the local doctor",
    "a retired captain",
    "the gardener",
    "the station master",
]
VERBS = [
    "repaired",
    "visited",
    "described",
    "measured",
    "painted",
    "cleaned",
    "inspected",
    "photographed",
    "explained",
    "rebuilt",
    "praised",
    "questioned",
]
THINGS = [
    "the wooden roof",
    "a narrow staircase",
    "the stone wall",
    "an iron gate",
    "the long corridor",
    "a small window",
    "the main entrance",
    "the east tower",
    "a broken clock",
    "the water tank",
    "the north road",
    "a heavy door",
]
WHEN = [
    "early in the morning",
    "after the spring rain",
    "during the winter storms",
    "on a quiet Sunday",
    "before the summer festival",
    "late in the evening",
    "in the first week of autumn",
    "while the market was closed",
]
BECAUSE = [
    "because the council had asked for a report",
    "so that visitors could return safely",
    "although nobody had seen it for years",
    "while the rest of the town was asleep",
    "since the old plans had been lost",
    "as the newspaper had promised",
    "and wrote down everything in a notebook",
    "without telling anyone else about it",
]
QUESTIONS = [
    "In one word, what is the report about?",
    "Who is mentioned first in the report?",
    "Name one thing that was repaired.",
    "When did the first visit happen?",
    "Is the report happy or sad?",
    "Give the report a short title.",
    "Which season is mentioned most?",
    "Name one person in the report.",
    "What was measured in the report?",
    "Where does the report take place?",
    "Summarize the report in five words.",
    "What should a visitor see first?",
]


@dataclass
class Result:
    name: str
    lines: int
    makespan_s: float  # wall: batches.create to completed
    queries: float  # vLLM prefix-cache queries (prompt tokens looked up)
    hits: float  # vLLM prefix-cache hits (prompt tokens found cached)
    prompt_tokens: float
    wall_s: float

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1.0, self.queries)


def sentence(rng: random.Random, topic: str) -> str:
    s = (
        f"{rng.choice(WHEN)}, {rng.choice(PEOPLE)} {rng.choice(VERBS)} "
        f"{rng.choice(THINGS)} of {topic} {rng.choice(BECAUSE)}."
    )
    return s[0].upper() + s[1:]


def report(rng: random.Random, index: int, tokens: int) -> str:
    """About `tokens` tokens of prose about one topic; the title first, so that reports differ
    from their first tokens on (nothing shared between them, for vLLM or for the planner)."""
    topic = TOPICS[index % len(TOPICS)]
    title = f"Report {index + 1} on {topic}"
    words = len(title.split())
    out = [title + "."]
    while words * TOKENS_PER_WORD < tokens:
        s = sentence(rng, topic)
        out.append(s)
        words += len(s.split())
    return " ".join(out)


def workload(args: argparse.Namespace) -> list[tuple[int, dict[str, object]]]:
    """(prefix index, body) of every request, shuffled."""
    rng = random.Random(args.seed)
    heads = [
        report(rng, k, rng.randint(args.prefix_min, args.prefix_max)) for k in range(args.prefixes)
    ]
    out: list[tuple[int, dict[str, object]]] = []
    for k, head in enumerate(heads):
        for j in range(args.questions):
            q = QUESTIONS[j % len(QUESTIONS)]
            if j >= len(QUESTIONS):
                q += f" (question {j + 1})"
            out.append((k, chat(head, q, args.max_tokens)))
    rng.shuffle(out)
    return out


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


def write_batch(path: Path, work: list[tuple[int, dict[str, object]]]) -> None:
    with path.open("w") as fh:
        for i, (_, body) in enumerate(work):
            line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions"}
            fh.write(json.dumps({**line, "body": body}, separators=(",", ":")) + "\n")


def config(vllm: VllmProcess, path: Path, args: argparse.Namespace) -> Path:
    path.write_text(
        f"""
[models.{MODEL}]
url = "{vllm.url}"
governor = false
max_concurrency = {args.concurrency}
timeout = 900
dedup = "off"
hot_groups = {"true" if args.hot == "on" else "false"}
group_warmup = {args.warmup}
"""
    )
    return path


def warm(vllm: VllmProcess) -> None:
    """One short request straight to vLLM: its first answers are slower (outside the phase)."""
    body = chat("You are a helpful assistant.", "Say hello.", 4)
    req = urllib.request.Request(
        vllm.url + "/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        resp.read()


def start_vllm(python: Path, model: Path, log: Path, args: argparse.Namespace) -> VllmProcess:
    max_len = args.prefix_max + 256  # the question, the chat template, the answer, slack
    return VllmProcess(
        python,
        model,
        log,
        served_name=MODEL,
        kv_cache_gib=1,
        extra_args=[
            "--enable-prefix-caching",
            "--block-size",
            str(args.block_size),
            "--num-gpu-blocks-override",
            str(args.kv_tokens // args.block_size),
            "--max-model-len",
            str(max_len),
        ],
    ).start(timeout=600)


def run_phase(
    name: str,
    work: list[tuple[int, dict[str, object]]],
    args: argparse.Namespace,
    tmp: Path,
    python: Path,
    model: Path,
    *,
    planned: bool,
) -> Result:
    wall0 = time.monotonic()
    slug = name.replace(" ", "-")
    path = tmp / f"{slug}.jsonl"
    write_batch(path, work)
    vllm = start_vllm(python, model, tmp / f"vllm-{slug}.log", args)
    try:
        warm(vllm)
        env = {
            "BACKFILL_PLAN_PREFIXES": "true" if planned else "false",
            "BACKFILL_SCHEDULER_INTERVAL": "0.2",
            "BACKFILL_REALTIME_RPM": "0",
        }
        cfg = config(vllm, tmp / f"{slug}.toml", args)
        with BackfillProcess(
            tmp / f"data-{slug}", api_keys=[KEY], extra_args=["--config", str(cfg)], env=env
        ) as bf:
            client = OpenAI(base_url=bf.base_url, api_key=KEY, max_retries=2, timeout=300)
            f = client.files.create(file=path.open("rb"), purpose="batch")
            hits0, queries0 = vllm.gauge(HITS), vllm.gauge(QUERIES)
            prompt0 = vllm.gauge(PROMPT_TOKENS)
            t0 = time.monotonic()
            b = client.batches.create(
                input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            while (b := client.batches.retrieve(b.id)).status not in (
                "completed",
                "failed",
                "expired",
                "cancelled",
            ):
                if time.monotonic() - t0 > args.timeout:
                    raise TimeoutError(f"{name}: batch not done in {args.timeout} s")
                time.sleep(0.2)
            makespan = time.monotonic() - t0
            counts = b.request_counts
            if b.status != "completed" or counts is None or counts.completed != len(work):
                raise RuntimeError(f"{name}: batch ended {b.status} ({counts}): {b.errors}")
            hits = vllm.gauge(HITS) - hits0
            queries = vllm.gauge(QUERIES) - queries0
            prompt = vllm.gauge(PROMPT_TOKENS) - prompt0
    finally:
        vllm.stop()
    result = Result(name, len(work), makespan, queries, hits, prompt, time.monotonic() - wall0)
    print(
        f"  {name:<12} {len(work):4d} requests   makespan {makespan:6.1f} s   prefix hits "
        f"{result.hit_rate:6.1%} ({hits:.0f} of {queries:.0f} tokens; prefilled "
        f"{queries - hits:.0f})   ({result.wall_s:.0f} s wall with vLLM's start)",
        flush=True,
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--prefixes", type=int, default=10, help="shared reports")
    parser.add_argument("--questions", type=int, default=8, help="requests per report")
    parser.add_argument("--prefix-min", type=int, default=400, help="report tokens, at least")
    parser.add_argument("--prefix-max", type=int, default=600, help="report tokens, at most")
    parser.add_argument("--max-tokens", type=int, default=6, help="max_tokens of each request")
    parser.add_argument(
        "--kv-tokens", type=int, default=1600, help="vLLM's KV cache in tokens (~3 reports)"
    )
    parser.add_argument("--block-size", type=int, default=32, help="vLLM's KV block, tokens")
    parser.add_argument("--concurrency", type=int, default=8, help="max_concurrency, all runs")
    parser.add_argument("--hot", choices=("on", "off"), default="on", help="hot_groups")
    parser.add_argument("--warmup", type=float, default=2.0, help="group_warmup seconds")
    parser.add_argument("--oracle", action="store_true", help="also the file sorted by prefix")
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per batch")
    args = parser.parse_args()
    if args.kv_tokens < args.prefix_max + 256:
        parser.error("--kv-tokens must hold one request: at least --prefix-max + 256")

    python = vllm_python()
    if python is None:
        print(f"no vLLM venv at {vllm_venv()}: build it with scripts/vllm-venv.sh", file=sys.stderr)
        return 2
    wall0 = time.monotonic()
    model = prepare()
    work = workload(args)
    blocks = args.kv_tokens // args.block_size
    print(
        f"vLLM on CPU 0 ({model.name}), prefix caching, KV cache {blocks} blocks of "
        f"{args.block_size} = {blocks * args.block_size} tokens; backfill max_concurrency "
        f"{args.concurrency}, hot groups {args.hot}, warm-up {args.warmup:g} s",
        flush=True,
    )
    print(
        f"{len(work)} requests: {args.prefixes} reports of ~{args.prefix_min}-{args.prefix_max} "
        f"tokens x {args.questions} questions, shuffled, max_tokens {args.max_tokens}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="prefix-vllm-") as tmp_name:
        tmp = Path(tmp_name)
        base = run_phase("file order", work, args, tmp, python, model, planned=False)
        print(f"  (mean prompt {base.prompt_tokens / len(work):.0f} tokens)", flush=True)
        plan = run_phase("planned", work, args, tmp, python, model, planned=True)
        oracle = None
        if args.oracle:
            ordered = sorted(work, key=lambda item: item[0])
            oracle = run_phase("oracle order", ordered, args, tmp, python, model, planned=False)
    print(
        f"planned vs file order: makespan {base.makespan_s:.1f} -> {plan.makespan_s:.1f} s "
        f"({base.makespan_s / plan.makespan_s:.2f}x faster); hit rate {base.hit_rate:.1%} -> "
        f"{plan.hit_rate:.1%} ({plan.hit_rate / max(1e-9, base.hit_rate):.2f}x); prefilled "
        f"tokens {plan.queries - plan.hits:.0f} vs {base.queries - base.hits:.0f} "
        f"({(plan.queries - plan.hits) / max(1.0, base.queries - base.hits):.2f}x)",
        flush=True,
    )
    if oracle is not None:
        print(
            f"oracle order: makespan {oracle.makespan_s:.1f} s "
            f"({base.makespan_s / oracle.makespan_s:.2f}x faster than file order), hit rate "
            f"{oracle.hit_rate:.1%} (planned/oracle {plan.hit_rate / oracle.hit_rate:.2f})",
            flush=True,
        )
    print(f"total wall time {time.monotonic() - wall0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
