"""Process millions: B batches of N requests queued at once against the zero-work upstream.

The issue's must-show is 20 batches of 50,000 requests (a million) on SQLite (one `backfill
serve`), then on PostgreSQL (`backfill serve --no-worker` + W `backfill worker` processes on a
scratch database, created and dropped here, sharing one local blob folder). Against
`backfill.testing.upstream` (the raw-asyncio echo server; it answers at once, so what is
measured is backfill).

Prints, per run:
- throughput over time: requests finished per `--interval` seconds (from the batches' request
  counts), and the rate of the first and the second half of the run (steady, not decaying);
- `GET /v1/batches` latency while it runs (each sample of the throughput is one such call);
- exactly once: every output file holds each of its batch's custom_ids once and no other, and
  no error file has a line;
- peak RSS (VmHWM) of every process: API, workers, the upstream;
- store and blob sizes after retention (segment blobs are deleted as each batch finalizes; the
  debris collector runs every few seconds here): inputs and outputs remain.

    python bench/million.py [--batches 20] [--requests 50000] [--backend sqlite|postgres|both]
                            [--workers 2] [--interval 5] [--concurrency 256]
                            [--postgres postgresql://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
from openai import OpenAI

from backfill.testing.process import start_upstream
from backfill.testing.server import BackfillProcess

TERMINAL = {"completed", "failed", "expired", "cancelled"}
KEY = "sk-bench-million"


def write_inputs(folder: Path, batches: int, requests: int) -> list[Path]:
    paths = []
    for b in range(batches):
        path = folder / f"input-{b:02d}.jsonl"
        with path.open("wb") as fh:
            for i in range(requests):
                body = {
                    "model": "m",
                    "messages": [{"role": "user", "content": f"Summarize item {b}-{i}."}],
                    "max_tokens": 16,
                }
                line = {
                    "custom_id": f"b{b}-r{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": body,
                }
                fh.write(orjson.dumps(line) + b"\n")
        paths.append(path)
    return paths


def peak_rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@contextmanager
def scratch_database(admin: str) -> Iterator[str]:
    import psycopg
    from sqlalchemy.engine import make_url

    libpq = make_url(admin).set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"bf_bench_{secrets.token_hex(6)}"
    with psycopg.connect(libpq, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(libpq).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(libpq, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def store_bytes(data_dir: Path, database: str | None) -> int:
    if database is None:
        return sum(p.stat().st_size for p in data_dir.glob("backfill.db*"))
    import psycopg
    from sqlalchemy.engine import make_url

    libpq = make_url(database).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(libpq) as conn:
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    return int(row[0]) if row else 0


def check_exactly_once(client: OpenAI, batch_ids: list[str], requests: int) -> list[str]:
    """Problems found: every batch completed, each custom_id once, nothing else."""
    problems = []
    for b, batch_id in enumerate(batch_ids):
        batch = client.batches.retrieve(batch_id)
        counts = batch.request_counts
        if batch.status != "completed" or counts is None or counts.completed != requests:
            problems.append(f"{batch_id}: {batch.status} {counts}")
        if batch.output_file_id is None:
            problems.append(f"{batch_id}: no output file")
            continue
        seen: set[str] = set()
        duplicates = 0
        data = client.files.content(batch.output_file_id).read()
        for line in data.splitlines():
            cid = orjson.loads(line)["custom_id"]
            duplicates += cid in seen
            seen.add(cid)
        expected = {f"b{b}-r{i}" for i in range(requests)}
        if duplicates or seen != expected:
            problems.append(
                f"{batch_id}: {duplicates} duplicates, {len(expected - seen)} missing, "
                f"{len(seen - expected)} foreign"
            )
        if batch.error_file_id is not None:
            errors = client.files.content(batch.error_file_id).read().splitlines()
            if errors:
                problems.append(f"{batch_id}: {len(errors)} error lines")
    return problems


def run(backend: str, args: argparse.Namespace, inputs: list[Path], up_url: str) -> None:
    with (
        tempfile.TemporaryDirectory() as tmp,
        scratch_database(args.postgres) if backend == "postgres" else _none() as database,
    ):
        data = Path(tmp) / "data"
        config = Path(tmp) / "backfill.toml"
        config.write_text(f'[models.m]\nurl = "{up_url}"\nmax_concurrency = {args.concurrency}\n')
        extra = ["--config", str(config)]
        if database:
            extra += ["--database", database]
        env = {
            "BACKFILL_DEBRIS_INTERVAL_SECONDS": "5",
            "BACKFILL_DEBRIS_GRACE_SECONDS": "5",
        }
        workers = args.workers if backend == "postgres" else 0
        api = BackfillProcess(
            data,
            api_keys=[KEY],
            extra_args=extra + (["--no-worker"] if workers else []),
            env=env,
        )
        procs = [api.start(timeout=60)]
        for _ in range(workers):
            procs.append(BackfillProcess(data, extra_args=extra, env=env, command="worker").start())
        try:
            measure(backend, args, inputs, api, procs, data, database)
        finally:
            for p in procs:
                p.stop()


@contextmanager
def _none() -> Iterator[None]:
    yield None


def measure(
    backend: str,
    args: argparse.Namespace,
    inputs: list[Path],
    api: BackfillProcess,
    procs: list[BackfillProcess],
    data: Path,
    database: str | None,
) -> None:
    client = OpenAI(base_url=api.base_url, api_key=KEY, max_retries=2, timeout=120)
    t_up = time.perf_counter()
    files = []
    for path in inputs:
        with path.open("rb") as fh:
            files.append(client.files.create(file=(path.name, fh), purpose="batch"))
    print(f"[{backend}] uploaded {len(files)} files in {time.perf_counter() - t_up:.1f} s")
    t0 = time.perf_counter()
    ids = [
        client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id
        for f in files
    ]
    total = len(ids) * args.requests
    print(f"[{backend}] {len(ids)} batches created in {time.perf_counter() - t0:.2f} s")
    samples: list[tuple[float, int]] = []  # (seconds since t0, requests finished)
    latencies: list[float] = []
    print(f"[{backend}]    t (s)   finished   req/s in interval")
    while True:
        time.sleep(args.interval)
        t_list = time.perf_counter()
        listed = client.batches.list(limit=100).data
        latencies.append(time.perf_counter() - t_list)
        mine = [b for b in listed if b.id in ids]
        finished = sum(
            (b.request_counts.completed + b.request_counts.failed) if b.request_counts else 0
            for b in mine
        )
        now = time.perf_counter() - t0
        prev_t, prev_n = samples[-1] if samples else (0.0, 0)
        samples.append((now, finished))
        rate = (finished - prev_n) / (now - prev_t)
        print(f"[{backend}] {now:8.1f} {finished:10d} {rate:12.0f}")
        if len(mine) == len(ids) and all(b.status in TERMINAL for b in mine):
            break
    elapsed = samples[-1][0]
    # steady or decaying: the median interval rate over the first and the second half of the
    # intervals that ran requests (the ramp before the first result and the last, partial
    # interval left out)
    rates = [
        (n - pn) / (t - pt)
        for (pt, pn), (t, n) in zip([(0.0, 0), *samples[:-1]], samples, strict=True)
        if pn > 0 and n < total
    ]
    first = statistics.median(rates[: len(rates) // 2]) if len(rates) >= 2 else float("nan")
    second = statistics.median(rates[len(rates) // 2 :]) if len(rates) >= 2 else float("nan")
    problems = check_exactly_once(client, ids, args.requests)
    # retention: segment blobs go as batches finalize, debris every 5 s; wait for it
    seg_root = data / "blobs" / "batches"
    deadline = time.monotonic() + 60
    while seg_root.exists() and any(seg_root.rglob("*")) and time.monotonic() < deadline:
        time.sleep(1)
    rss = [(p.command, peak_rss_mib(p.proc.pid)) for p in procs if p.proc is not None]
    print(f"[{backend}] --- {len(ids)} x {args.requests} = {total} requests")
    print(f"[{backend}] all finished in {elapsed:.1f} s: {total / elapsed:.0f} requests/s")
    print(
        f"[{backend}] steady: median interval rate, first half {first:.0f} req/s, second "
        f"half {second:.0f} req/s (second/first {second / first:.2f}; {len(rates)} intervals)"
    )
    lat = sorted(latencies)
    print(
        f"[{backend}] GET /v1/batches while running: n={len(lat)} "
        f"p50={statistics.median(lat) * 1000:.0f} ms "
        f"p90={lat[int(0.9 * (len(lat) - 1))] * 1000:.0f} ms max={lat[-1] * 1000:.0f} ms"
    )
    print(f"[{backend}] exactly once: {'OK' if not problems else 'FAILED'}")
    for p in problems[:20]:
        print(f"[{backend}]   {p}")
    for name, mib in rss:
        print(f"[{backend}] peak RSS {name:7s} {mib:8.1f} MiB")
    blobs = folder_bytes(data / "blobs")
    segs = folder_bytes(seg_root) if seg_root.exists() else 0
    inputs_bytes = sum(p.stat().st_size for p in inputs)
    print(
        f"[{backend}] after retention: store {store_bytes(data, database) / 2**20:.1f} MiB, "
        f"blobs {blobs / 2**20:.1f} MiB (inputs {inputs_bytes / 2**20:.1f} MiB + outputs; "
        f"segments left {segs} bytes)"
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--requests", type=int, default=50_000, help="requests per batch")
    ap.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    ap.add_argument("--workers", type=int, default=2, help="worker processes on PostgreSQL")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--concurrency", type=int, default=256, help="the model's max_concurrency")
    ap.add_argument(
        "--postgres",
        default=os.environ.get(
            "BACKFILL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="admin URL; a scratch database is created on it and dropped",
    )
    args = ap.parse_args()
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    with tempfile.TemporaryDirectory() as tmp, start_upstream() as up:
        inputs = write_inputs(Path(tmp), args.batches, args.requests)
        for backend in backends:
            run(backend, args, inputs, up.url)
            print(f"[{backend}] peak RSS upstream {peak_rss_mib(up.proc.pid):8.1f} MiB")
            up.reset()
    return 0


if __name__ == "__main__":
    sys.exit(main())
