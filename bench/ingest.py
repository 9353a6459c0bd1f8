"""Ingest benchmark: upload + validation of a generated 50,000-line, ~100 MB batch file.

Prints the time from the start of the upload to the batch reaching `in_progress`, the two parts
(upload, then create -> in_progress), and the peak RSS of the `backfill serve` process
(VmHWM from /proc). Targets on a 2-core machine: <= 3 s and <= 150 MiB.

Baseline printed beside it: the time to merely copy the same bytes over loopback HTTP to the
same server's health endpoint is not comparable, so we print the raw disk-write time of the file
(the floor for storing it) and the ratio of our total against that floor.

    python bench/ingest.py [--lines 50000] [--line-bytes 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import sys
import tempfile
import time
from pathlib import Path

from openai import OpenAI

from backfill.testing.process import start_upstream
from backfill.testing.server import BackfillProcess


def make_file(path: Path, lines: int, line_bytes: int) -> int:
    rnd = random.Random(7)
    words = ["".join(rnd.choices(string.ascii_lowercase, k=rnd.randint(3, 9))) for _ in range(500)]
    with path.open("wb") as fh:
        for i in range(lines):
            text = " ".join(rnd.choices(words, k=line_bytes // 6))
            obj = {
                "custom_id": f"req-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "m",
                    "messages": [{"role": "user", "content": text[: line_bytes - 160]}],
                    "max_tokens": 16,
                },
            }
            fh.write(json.dumps(obj).encode() + b"\n")
    return path.stat().st_size


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=50_000)
    ap.add_argument("--line-bytes", type=int, default=2000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        src = tmpd / "input.jsonl"
        size = make_file(src, args.lines, args.line_bytes)
        t = time.perf_counter()
        data = src.read_bytes()
        (tmpd / "copy.jsonl").write_bytes(data)
        os.sync()
        floor = time.perf_counter() - t
        del data
        with (
            start_upstream() as up,
            BackfillProcess(tmpd / "data", api_keys=["sk-bench"], models=[f"m={up.url}"]) as srv,
        ):
            assert srv.proc is not None
            client = OpenAI(base_url=srv.base_url, api_key="sk-bench", max_retries=0)
            rss_idle = peak_rss_mib(srv.proc.pid)
            t0 = time.perf_counter()
            with src.open("rb") as fh:
                f = client.files.create(file=("input.jsonl", fh), purpose="batch")
            t_up = time.perf_counter()
            batch = client.batches.create(
                input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            while batch.status == "validating":
                time.sleep(0.02)
                batch = client.batches.retrieve(batch.id)
            t_ready = time.perf_counter()
            rss = peak_rss_mib(srv.proc.pid)
            client.batches.cancel(batch.id)
            total = t_ready - t0
            print(f"file: {args.lines} lines, {size / 1e6:.1f} MB")
            print(f"status after validation: {batch.status} (total={batch.request_counts.total})")
            print(f"upload: {t_up - t0:.2f} s, create -> in_progress: {t_ready - t_up:.2f} s")
            print(f"upload start -> in_progress: {total:.2f} s (target <= 3 s)")
            print(f"server peak RSS: {rss:.0f} MiB (at startup {rss_idle:.0f} MiB; target <= 150)")
            print(
                f"baseline (write the same bytes to disk + sync): {floor:.2f} s; "
                f"ratio {total / floor:.1f}x"
            )
            ok = batch.status == "in_progress" and total <= 3.0 and rss <= 150
            print("TARGET MET" if ok else "TARGET MISSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
