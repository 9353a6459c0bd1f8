"""Restarting `backfill serve` on the same data dir: nothing is forgotten, work resumes."""

from __future__ import annotations

import signal
from pathlib import Path

from acceptance_settings import FAST_ENV
from openai import OpenAI
from polling import poll
from sdk_helpers import chat_line, read_jsonl, run_batch, submit, wait_batch

from backfill.testing import UpstreamProcess
from backfill.testing.server import BackfillProcess

KEY = "sk-acceptance-restart"


def start(
    servers: list[BackfillProcess], data_dir: Path, upstream: UpstreamProcess
) -> tuple[BackfillProcess, OpenAI]:
    proc = BackfillProcess(data_dir, api_keys=[KEY], models=[f"m={upstream.url}"], env=FAST_ENV)
    servers.append(proc)
    proc.start()
    return proc, OpenAI(base_url=proc.base_url, api_key=KEY, max_retries=1, timeout=15.0)


def snapshot(client: OpenAI) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    files = [f.model_dump() for f in client.files.list(limit=10_000)]
    batches = [b.model_dump() for b in client.batches.list(limit=100)]
    return files, batches


def test_clean_restart_keeps_everything_and_resumes(
    tmp_path: Path, upstream: UpstreamProcess, servers: list[BackfillProcess]
) -> None:
    first, client = start(servers, tmp_path, upstream)
    done = [
        run_batch(client, [chat_line(f"a{i}", f"before {i}") for i in range(3)]),
        run_batch(client, [chat_line("bad", "x", model="unknown")]),
    ]
    assert [b.status for b in done] == ["completed", "failed"]
    before_files, before_batches = snapshot(client)
    assert len(before_files) == 3  # two inputs and one output
    assert len(before_batches) == 2

    # requests that take a while, so the batch is still running when the server stops
    ids = [f"late-{i}" for i in range(6)]
    late = submit(client, [chat_line(c, f"{c} #sleep:1000") for c in ids])
    poll(
        lambda: client.batches.retrieve(late.id),
        lambda b: b.status != "validating",
        what="the late batch to start",
    )
    first.stop()
    # graceful: it exited by itself (uvicorn re-raises the SIGTERM it handled, hence -15),
    # not by the SIGKILL that `stop()` falls back to after its timeout
    assert first.proc is not None
    assert first.proc.returncode in (0, -signal.SIGTERM), first.logs()

    _, client = start(servers, tmp_path, upstream)
    after_files, after_batches = snapshot(client)
    # the late batch is the newest; everything older is listed exactly as before
    assert [b["id"] for b in after_batches] == [late.id] + [b["id"] for b in before_batches]
    assert after_batches[1:] == before_batches
    assert [f for f in after_files if f["id"] in {g["id"] for g in before_files}] == before_files
    for b in done:
        assert client.batches.retrieve(b.id).model_dump() == b.model_dump()
    assert client.files.content(done[0].output_file_id or "").content

    finished = wait_batch(client, late.id, timeout=30)
    assert finished.status == "completed", finished
    assert finished.request_counts is not None
    counts = finished.request_counts
    assert (counts.total, counts.completed, counts.failed) == (6, 6, 0)
    assert finished.output_file_id is not None
    out = read_jsonl(client, finished.output_file_id)
    assert [o["custom_id"] for o in out] == ids
    assert finished.error_file_id is None


def test_batch_created_just_before_restart_completes(
    tmp_path: Path, upstream: UpstreamProcess, servers: list[BackfillProcess]
) -> None:
    first, client = start(servers, tmp_path, upstream)
    batch = submit(client, [chat_line(f"r{i}", f"quick {i}") for i in range(4)])
    first.stop()

    _, client = start(servers, tmp_path, upstream)
    finished = wait_batch(client, batch.id)
    assert finished.status == "completed", finished
    assert finished.output_file_id is not None
    out = read_jsonl(client, finished.output_file_id)
    assert [o["custom_id"] for o in out] == ["r0", "r1", "r2", "r3"]
    assert finished.request_counts is not None
    assert finished.request_counts.completed == 4


def test_kill_9_mid_batch_loses_nothing_and_duplicates_nothing(
    tmp_path: Path, upstream: UpstreamProcess, servers: list[BackfillProcess]
) -> None:
    first, client = start(servers, tmp_path, upstream)
    ids = [f"k{i:02d}" for i in range(10)]
    # half answer at once, half take a while: the kill lands with work recorded and in flight
    lines = [chat_line(c, f"{c}" + (" #sleep:1500" if i % 2 else "")) for i, c in enumerate(ids)]
    batch = submit(client, lines)
    poll(
        lambda: client.batches.retrieve(batch.id),
        lambda b: b.request_counts is not None and b.request_counts.completed >= 1,
        what="some results to be recorded",
    )
    first.kill()

    _, client = start(servers, tmp_path, upstream)
    finished = wait_batch(client, batch.id, timeout=40)
    assert finished.status == "completed", finished
    assert finished.request_counts is not None
    counts = finished.request_counts
    assert (counts.total, counts.completed, counts.failed) == (10, 10, 0)
    assert finished.output_file_id is not None
    out = read_jsonl(client, finished.output_file_id)
    assert [o["custom_id"] for o in out] == ids
    assert len({o["id"] for o in out}) == 10
