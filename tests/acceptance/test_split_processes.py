"""`backfill serve --no-worker` plus a separate `backfill worker` on the same data dir."""

from __future__ import annotations

from pathlib import Path

import pytest
from acceptance_settings import FAST_ENV
from openai import ConflictError, OpenAI
from polling import poll
from sdk_helpers import chat_line, read_jsonl, submit, wait_batch

from backfill.testing import UpstreamProcess
from backfill.testing.server import BackfillProcess

KEY = "sk-acceptance-split"


def test_api_only_then_a_separate_worker(
    tmp_path: Path, upstream: UpstreamProcess, servers: list[BackfillProcess]
) -> None:
    models = [f"m={upstream.url}"]
    api = BackfillProcess(
        tmp_path, api_keys=[KEY], models=models, extra_args=["--no-worker"], env=FAST_ENV
    )
    servers.append(api)
    api.start()
    client = OpenAI(base_url=api.base_url, api_key=KEY, max_retries=1, timeout=15.0)

    # nothing runs without a worker: a cancel gives every request a batch_cancelled line
    ids = [f"c{i}" for i in range(4)]
    never = submit(client, [chat_line(c, c) for c in ids])
    waiting = wait_batch(client, never.id, statuses={"in_progress"})
    assert waiting.request_counts is not None
    assert (waiting.request_counts.total, waiting.request_counts.completed) == (4, 0)
    # the input of an unfinished batch cannot be deleted from under it
    with pytest.raises(ConflictError) as info:
        client.files.delete(never.input_file_id)
    assert info.value.response.headers["x-should-retry"] == "false"
    assert client.batches.cancel(never.id).status == "cancelling"
    cancelled = wait_batch(client, never.id)
    assert cancelled.status == "cancelled", cancelled
    assert cancelled.output_file_id is None
    assert cancelled.error_file_id is not None
    assert cancelled.request_counts is not None
    counts = cancelled.request_counts
    assert (counts.total, counts.completed, counts.failed) == (4, 0, 4)
    errors = read_jsonl(client, cancelled.error_file_id)
    assert [e["custom_id"] for e in errors] == ids
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    # once the batch is over its input may go
    assert client.files.delete(never.input_file_id).deleted is True

    # a worker process started later picks the waiting batch up
    batch = submit(client, [chat_line(f"w{i}", f"work {i}") for i in range(5)])
    wait_batch(client, batch.id, statuses={"in_progress"})
    worker = BackfillProcess(tmp_path, models=models, env=FAST_ENV, command="worker")
    servers.append(worker)
    worker.start()
    done = poll(
        lambda: client.batches.retrieve(batch.id),
        lambda b: b.status == "completed" or worker.proc is None or worker.proc.poll() is not None,
        timeout=30,
        what="the worker to finish the batch",
    )
    assert done.status == "completed", worker.logs()
    assert done.output_file_id is not None
    out = read_jsonl(client, done.output_file_id)
    assert [o["custom_id"] for o in out] == [f"w{i}" for i in range(5)]
