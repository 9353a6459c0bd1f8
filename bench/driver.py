"""Driver benchmark: a 50,000-request batch end to end against a zero-work upstream on
loopback, beside a plain `AsyncOpenAI` loop at the same concurrency over the same requests.

Both runs hit the same upstream process (`backfill.testing.upstream`, a raw-asyncio echo server
on its own core), so the difference is the client side: backfill's worker (aiohttp, orjson,
segment checkpoints, store writes) versus the official SDK driven by a semaphore.

Prints requests/s for both and the ratio. Targets: >= 3,000 requests/s and >= 8x.

    python bench/driver.py [--requests 50000] [--concurrency 256] [--database URL]
                           [--workers N] [--sdk-requests N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from openai import AsyncOpenAI, OpenAI

from backfill.testing.process import start_upstream
from backfill.testing.server import BackfillProcess

TERMINAL = {"completed", "failed", "expired", "cancelled"}


def bodies(n: int) -> list[dict[str, Any]]:
    return [
        {
            "model": "m",
            "messages": [{"role": "user", "content": f"Summarize item {i} in one line."}],
            "max_tokens": 16,
        }
        for i in range(n)
    ]


def run_backfill(
    tmp: Path, up_url: str, reqs: list[dict[str, Any]], args: argparse.Namespace
) -> float:
    src = tmp / "input.jsonl"
    with src.open("wb") as fh:
        for i, body in enumerate(reqs):
            line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions"}
            fh.write(json.dumps({**line, "body": body}).encode() + b"\n")
    config = tmp / "backfill.toml"
    config.write_text(f'[models.m]\nurl = "{up_url}"\nmax_concurrency = {args.concurrency}\n')
    extra = ["--config", str(config)]
    if args.database:
        extra += ["--database", args.database]
    procs: list[BackfillProcess] = []
    srv = BackfillProcess(
        tmp / "data",
        api_keys=["sk-bench"],
        extra_args=extra + (["--no-worker"] if args.workers else []),
    )
    srv.start()
    procs.append(srv)
    for _ in range(args.workers):
        procs.append(BackfillProcess(tmp / "data", extra_args=extra, command="worker").start())
    try:
        client = OpenAI(base_url=srv.base_url, api_key="sk-bench")
        with src.open("rb") as fh:
            f = client.files.create(file=("input.jsonl", fh), purpose="batch")
        t0 = time.perf_counter()
        batch = client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        while batch.status not in TERMINAL:
            time.sleep(0.05)
            batch = client.batches.retrieve(batch.id)
        elapsed = time.perf_counter() - t0
        counts = batch.request_counts
        assert counts is not None
        print(
            f"backfill: {batch.status}, completed={counts.completed} failed={counts.failed} "
            f"in {elapsed:.2f} s"
        )
        if batch.status != "completed" or counts.completed != len(reqs):
            print("backfill run did not complete every request", file=sys.stderr)
            print(srv.logs(), file=sys.stderr)
        return len(reqs) / elapsed
    finally:
        for p in procs:
            p.stop()


async def run_sdk(up_url: str, reqs: list[dict[str, Any]], concurrency: int) -> float:
    client = AsyncOpenAI(base_url=up_url, api_key="unused", max_retries=0)
    sem = asyncio.Semaphore(concurrency)

    async def one(body: dict[str, Any]) -> None:
        async with sem:
            await client.chat.completions.create(**body)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(b) for b in reqs))
    elapsed = time.perf_counter() - t0
    await client.close()
    print(f"AsyncOpenAI loop: {len(reqs)} requests in {elapsed:.2f} s")
    return len(reqs) / elapsed


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=50_000)
    ap.add_argument("--sdk-requests", type=int, default=0, help="0: same as --requests")
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--database", help="e.g. postgresql://postgres@127.0.0.1:5432/bench")
    ap.add_argument("--workers", type=int, default=0, help="separate worker processes")
    args = ap.parse_args()
    reqs = bodies(args.requests)
    with tempfile.TemporaryDirectory() as tmp, start_upstream() as up:
        bf = run_backfill(Path(tmp), up.url, reqs, args)
        up.reset()
        sdk_reqs = reqs[: args.sdk_requests] if args.sdk_requests else reqs
        sdk = asyncio.run(run_sdk(up.url, sdk_reqs, args.concurrency))
    print(f"backfill:         {bf:8.0f} requests/s  (target >= 3000)")
    print(
        f"AsyncOpenAI loop: {sdk:8.0f} requests/s  (same upstream, concurrency {args.concurrency})"
    )
    print(f"ratio:            {bf / sdk:8.1f}x        (target >= 8x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
