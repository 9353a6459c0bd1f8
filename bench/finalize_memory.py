"""Finalization memory: peak RSS of merging a batch's segments into its output and error files.

Two cases, each on a local blob store in a temp dir with a SQLite store, segments built directly
through the store and blob APIs (as a worker would leave them), then `finalize` run:

- `big`:   20 answers of 50 MB each (1 GB) in one shard, 4 segments, recorded out of order;
- `small`: 50,000 answers of ~0.5 KB in 25 shards of 2,000, segments of 250 recorded in
           completion order (shuffled within a window of 32), 2% errors.

Each case runs twice, each time in a fresh child process: the current finalizer and, as the
baseline in the same run, the finalizer of `--baseline` (a git revision; default: the last one
before the streaming merge), loaded from `git show` into a temp module. The child resets its
peak RSS just before `finalize` (`/proc/self/clear_refs`; a sampling thread where that is not
available) and reports the growth over the RSS before it, the time, and a digest of the files
written, which must agree between the two.

Printed per case: peak RSS growth, the largest line, growth / largest line, the time, and each
figure against the baseline. Needs ~2.2 GB free in the temp dir (deleted afterwards) and, for
the baseline's big case, ~3.5 GB of RAM.

    python bench/finalize_memory.py [--case big|small|all] [--baseline REV | --no-baseline]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import importlib.util
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from backfill.blobs import open_blobs
from backfill.blobs.base import Blobs
from backfill.domain.records import BatchRecord, FileRecord, Segment, Shard
from backfill.domain.results import ERROR, OUTPUT, segment_record
from backfill.domain.statuses import BatchStatus
from backfill.store import Store, open_store

#: the last revision whose finalizer loaded whole segments (`blobs.get` + `merge_segments`)
BASELINE = "84e83ed4cf7bbb0b3acae3077c1c6571a0269df7"
REPO = Path(__file__).resolve().parent.parent
CHAT = "/v1/chat/completions"
NOW = 1_800_000_000
MIB = 1 << 20

Finalize = Callable[..., Awaitable[BatchRecord | None]]


# -- measuring ---------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class PeakRss:
    """Peak RSS over a block: the kernel's high-water mark reset at the start, or a thread
    sampling every millisecond where that cannot be reset."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRss:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            import psutil  # type: ignore[import-untyped]

            proc = psutil.Process()

            def sample() -> None:
                while not self._stop.is_set():
                    self.peak = max(self.peak, proc.memory_info().rss)
                    time.sleep(0.001)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:
            self.peak = _status_kib("VmHWM") * 1024


def rss() -> int:
    try:
        return _status_kib("VmRSS") * 1024
    except (OSError, RuntimeError):
        import psutil

        return int(psutil.Process().memory_info().rss)


# -- building a batch that is ready to finalize -----------------------------------------------
def request(cid: str) -> bytes:
    body = {"model": "m", "messages": [{"role": "user", "content": f"question {cid}"}]}
    return orjson.dumps({"custom_id": cid, "method": "POST", "url": CHAT, "body": body})


def answer(cid: str, text: str) -> bytes:
    body = {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 99, "total_tokens": 108},
    }
    response = {"status_code": 200, "request_id": "req_" + cid, "body": body}
    return orjson.dumps(
        {"id": "batch_req_" + cid, "custom_id": cid, "response": response, "error": None}
    )


def failure(cid: str) -> bytes:
    error = {"code": "upstream_error", "message": "the engine said no"}
    return orjson.dumps(
        {"id": "batch_req_" + cid, "custom_id": cid, "response": None, "error": error}
    )


class Layout:
    """Which line goes to which shard and segment, in which order, and what it says."""

    def __init__(self, case: str) -> None:
        rng = random.Random(11)
        if case == "big":
            self.lines, self.shard_size, self.segment_size, self.window = 20, 20, 5, 20
            filler = "x" * (50 * MIB - 300)
            self.make: Callable[[int], tuple[bytes, bytes]] = lambda n: (
                OUTPUT,
                answer(f"c{n}", filler),
            )
        else:
            self.lines, self.shard_size, self.segment_size, self.window = 50_000, 2000, 250, 32
            words = [f"w{i}" for i in range(300)]
            texts = [" ".join(rng.choices(words, k=rng.randint(40, 100))) for _ in range(997)]
            self.make = lambda n: (
                (ERROR, failure(f"c{n}"))
                if n % 50 == 0
                else (OUTPUT, answer(f"c{n}", texts[n % 997]))
            )
        self.rng = rng

    def shards(self) -> list[list[int]]:
        nos = list(range(1, self.lines + 1))
        return [nos[i : i + self.shard_size] for i in range(0, self.lines, self.shard_size)]

    def completion_order(self, nos: list[int]) -> list[int]:
        order = list(nos)
        for w in range(0, len(order), self.window):
            window = order[w : w + self.window]
            self.rng.shuffle(window)
            order[w : w + self.window] = window
        return order


async def build(store: Store, blobs: Blobs, case: str) -> tuple[BatchRecord, int]:
    """A batch in `finalizing` whose segments hold every line; returns it and its largest
    line."""
    layout = Layout(case)
    project = store.ensure_project("bench")
    data = b"".join(request(f"c{n}") + b"\n" for n in range(1, layout.lines + 1))
    await blobs.put("files/in", data)
    store.insert_file(
        FileRecord("file-in", project.id, "in.jsonl", "batch", len(data), NOW, "files/in")
    )
    batch_id = f"batch_bench_{case}"
    store.insert_batch(
        BatchRecord(
            id=batch_id,
            project_id=project.id,
            endpoint=CHAT,
            input_file_id="file-in",
            completion_window="24h",
            status=BatchStatus.VALIDATING,
            created_at=NOW,
            expires_at=NOW + 86400,
        )
    )
    groups = layout.shards()
    plan, start = [], 0
    for index, nos in enumerate(groups):
        end = start + sum(len(request(f"c{n}")) + 1 for n in nos)
        plan.append(Shard(batch_id, index, nos[0], start, end, len(nos)))
        start = end
    assert store.start_batch(batch_id, plan, model="m", total=layout.lines, now=NOW)
    largest = 0
    for n in range(len(plan)):
        token = f"tok{n}"
        shard = store.lease_shard("bench", token, now=NOW, lease_seconds=1e6)
        assert shard is not None
        order = layout.completion_order(groups[shard.index])
        for seq, at in enumerate(range(0, len(order), layout.segment_size)):
            part = order[at : at + layout.segment_size]
            counts = {OUTPUT: 0, ERROR: 0}

            async def records(
                part: list[int] = part, counts: dict[bytes, int] = counts
            ) -> AsyncIterator[bytes]:
                nonlocal largest
                for no in part:
                    kind, line = layout.make(no)
                    counts[kind] += 1
                    largest = max(largest, len(line))
                    yield segment_record(no, kind, line)

            path = f"batches/{batch_id}/seg/{shard.index:05d}-{seq:06d}"
            await blobs.put_stream(path, records())
            seg = Segment(batch_id, shard.index, seq, path, counts[OUTPUT], counts[ERROR])
            assert store.record_segment(seg, token)
        assert store.finish_shard(batch_id, shard.index, token)
    moved = store.transition(batch_id, [BatchStatus.IN_PROGRESS], BatchStatus.FINALIZING)
    assert moved is not None
    return moved, largest


# -- one measured finalization (child process) ------------------------------------------------
def load_finalize(impl: str, baseline: str, tmp: Path) -> Finalize:
    if impl == "new":
        from backfill.scheduler.finalizer import finalize

        return finalize
    # the old finalizer with the old pure helpers it imported (they have changed since:
    # `merge_segments`, `iter_segment`, a synchronous `iter_requests`), all from `baseline`
    for module in BASELINE_MODULES:
        _load_baseline(baseline, module, tmp)
    fn: Finalize = _load_baseline(baseline, "scheduler/finalizer", tmp).finalize
    return fn


#: the modules of the baseline loaded from git, imported by each other under `baseline_*` names
BASELINE_MODULES = ("domain/results", "domain/finalize", "domain/inputs")


def _load_baseline(baseline: str, module: str, tmp: Path) -> Any:
    source = subprocess.run(
        ["git", "show", f"{baseline}:src/backfill/{module}.py"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for other in BASELINE_MODULES:
        dotted = "backfill." + other.replace("/", ".")
        source = source.replace(f"from {dotted} import", f"from {_baseline_name(other)} import")
    name = _baseline_name(module)
    path = tmp / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[name] = loaded
    spec.loader.exec_module(loaded)
    return loaded


def _baseline_name(module: str) -> str:
    return "baseline_" + module.replace("/", "_")


async def digest(blobs: Blobs, store: Store, file_id: str | None) -> tuple[str, int]:
    if file_id is None:
        return "-", 0
    file = store.get_file(file_id)
    assert file is not None
    h = hashlib.sha256()
    async for chunk in blobs.stream(file.blob_path, chunk_size=8 * MIB):
        h.update(chunk)
    return h.hexdigest()[:16], file.bytes


def child(case: str, impl: str, baseline: str, tmp_root: str | None) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bf-finalize-bench-", dir=tmp_root))
    try:
        store = open_store(f"sqlite:///{tmp / 'store.db'}")
        store.migrate()
        blobs = open_blobs(str(tmp / "blobs"), tmp)
        finalize = load_finalize(impl, baseline, tmp)

        async def run() -> dict[str, Any]:
            batch, largest = await build(store, blobs, case)
            gc.collect()
            before = rss()
            with PeakRss() as peak:
                t0, c0 = time.perf_counter(), time.process_time()
                done = await finalize(
                    store,
                    blobs,
                    batch,
                    BatchStatus.COMPLETED,
                    frozenset({BatchStatus.FINALIZING}),
                    NOW,
                )
                seconds = time.perf_counter() - t0
                cpu = time.process_time() - c0
            assert done is not None and done.status is BatchStatus.COMPLETED
            out, out_bytes = await digest(blobs, store, done.output_file_id)
            err, err_bytes = await digest(blobs, store, done.error_file_id)
            return {
                "growth": peak.peak - before,
                "before": before,
                "largest": largest,
                "seconds": seconds,
                "cpu": cpu,
                "output": f"{out} ({out_bytes / MIB:.1f} MiB)",
                "error": f"{err} ({err_bytes / MIB:.2f} MiB)",
            }

        result = asyncio.run(run())
        store.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result), flush=True)
    os._exit(0)  # skip interpreter teardown (obstore's runtime can abort at exit)


# -- the parent: run each case with each finalizer and print ----------------------------------
def measure(case: str, impl: str, baseline: str, tmp_root: str | None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", case, impl, "--baseline", baseline]
    if tmp_root:
        cmd += ["--tmp", tmp_root]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
    if not lines:
        raise SystemExit(f"{case}/{impl} failed (rc {done.returncode}):\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def size(n: float) -> str:
    return f"{n / MIB:.1f} MiB" if n >= MIB else f"{n / 1024:.2f} KiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", choices=["big", "small", "all"], default="all")
    ap.add_argument("--baseline", default=BASELINE, help="git revision of the old finalizer")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="runs of the small case (median)")
    ap.add_argument("--tmp", default=None, help="where to build the data (default: $TMPDIR)")
    ap.add_argument("--child", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.baseline, args.tmp)
        return 0
    cases = ["big", "small"] if args.case == "all" else [args.case]
    impls = ["new"] if args.no_baseline else ["new", "old"]
    print(f"finalize on a local blob store + SQLite; baseline {args.baseline[:12]}")
    for case in cases:
        runs = 1 if case == "big" else max(1, args.repeat)
        got: dict[str, dict[str, Any]] = {}
        samples: dict[str, list[dict[str, Any]]] = {impl: [] for impl in impls}
        for _ in range(runs):
            for impl in impls:  # interleaved, so both see the same load on the machine
                samples[impl].append(measure(case, impl, args.baseline, args.tmp))
        for impl in impls:
            rs = samples[impl]
            got[impl] = {
                **rs[0],
                "growth": statistics.median(r["growth"] for r in rs),
                "seconds": statistics.median(r["seconds"] for r in rs),
                "cpu": statistics.median(r["cpu"] for r in rs),
            }
        new = got["new"]
        median = f", median of {runs} runs" if runs > 1 else ""
        print(f"\n[{case}] largest line {size(new['largest'])}{median}")
        for impl in impls:
            r = got[impl]
            print(
                f"  {impl:>3}: peak RSS growth {r['growth'] / MIB:8.1f} MiB"
                f" (from {r['before'] / MIB:.0f} MiB)"
                f"  growth/largest line {r['growth'] / r['largest']:9.2f}"
                f"  time {r['seconds']:6.2f} s (cpu {r['cpu']:5.2f} s)"
                f"  output {r['output']}  errors {r['error']}"
            )
        if "old" in got:
            old = got["old"]
            same = all(
                (r["output"], r["error"]) == (new["output"], new["error"])
                for rs in samples.values()
                for r in rs
            )
            print(
                f"  new/old: peak RSS growth {new['growth'] / max(old['growth'], 1):.3f}x"
                f" ({old['growth'] / max(new['growth'], 1):.1f}x less),"
                f" time {new['seconds'] / old['seconds']:.2f}x,"
                f" cpu {new['cpu'] / old['cpu']:.2f}x;"
                f" same files: {'yes' if same else 'NO'}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
