"""Many small batches: N one-request batches, each request taking S seconds at the upstream,
created at once; the time from the first create to the last batch completed.

Run twice on the same upstream (`backfill.testing.upstream`, `#sleep:MS` per request): with the
worker capped at 4 shards (`BACKFILL_WORKER_MAX_SHARDS=4`, what `worker_shards = 4` did before
the shard count followed the models' room) and with the default. Prints both and the ratio.
The floor is N / 4 x S for the capped run and about S (plus scheduling) for the other.

    python bench/small_batches.py [--batches 16] [--sleep-ms 3000] [--database URL]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from openai import OpenAI

from backfill.testing.process import start_upstream
from backfill.testing.server import BackfillProcess

TERMINAL = {"completed", "failed", "expired", "cancelled"}


def run(tmp: Path, up_url: str, args: argparse.Namespace, env: dict[str, str]) -> float:
    config = tmp / "backfill.toml"
    config.write_text(f'[models.m]\nurl = "{up_url}"\n')
    extra = ["--config", str(config)]
    if args.database:
        extra += ["--database", args.database]
    srv = BackfillProcess(tmp / "data", api_keys=["sk-bench"], extra_args=extra, env=env)
    srv.start()
    try:
        client = OpenAI(base_url=srv.base_url, api_key="sk-bench")
        files = []
        for i in range(args.batches):
            body = {
                "model": "m",
                "messages": [{"role": "user", "content": f"batch {i} #sleep:{args.sleep_ms}"}],
            }
            line = {"custom_id": "r0", "method": "POST", "url": "/v1/chat/completions"}
            data = json.dumps({**line, "body": body}).encode() + b"\n"
            files.append(client.files.create(file=(f"in{i}.jsonl", data), purpose="batch"))
        t0 = time.perf_counter()
        ids = [
            client.batches.create(
                input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
            ).id
            for f in files
        ]
        pending = set(ids)
        while pending:
            time.sleep(0.05)
            for batch_id in list(pending):
                batch = client.batches.retrieve(batch_id)
                if batch.status in TERMINAL:
                    counts = batch.request_counts
                    if batch.status != "completed" or counts is None or counts.completed != 1:
                        print(f"{batch_id}: {batch.status} {counts}", file=sys.stderr)
                        if batch.error_file_id:
                            text = client.files.content(batch.error_file_id).text
                            print(text[:500], file=sys.stderr)
                    pending.discard(batch_id)
        return time.perf_counter() - t0
    finally:
        srv.stop()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--sleep-ms", type=int, default=3000)
    ap.add_argument("--database", help="default: SQLite in a temporary folder")
    args = ap.parse_args()
    results = {}
    with start_upstream() as up:
        for name, env in (
            ("4 shards (before)", {"BACKFILL_WORKER_MAX_SHARDS": "4"}),
            ("capacity (after)", {}),
        ):
            with tempfile.TemporaryDirectory() as tmp:
                results[name] = run(Path(tmp), up.url, args, env)
            up.reset()
    seconds = args.sleep_ms / 1000
    print(f"{args.batches} one-request batches, {seconds:g} s per request:")
    for name, elapsed in results.items():
        print(f"  {name:18s} {elapsed:6.2f} s")
    before, after = results.values()
    print(f"  ratio              {before / after:6.2f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
