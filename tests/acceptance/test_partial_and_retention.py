"""Partial results while a batch runs, file retention, and per-request timeouts, through a real
`backfill serve`.

- `GET /v1/batches/{id}/output` while the batch is in progress answers a snapshot
  (`x-backfill-complete: false`) whose lines are all in the final output, byte for byte; after
  completion it answers the final file (`x-backfill-complete: true`).
- Retention: a file past its `expires_after` is deleted (404, its blob gone) on the next
  retention pass, except the input of a running batch, which is kept until the batch ends.
  The API's minimum `expires_after` is one hour, so the test moves the recorded `expires_at`
  into the past in the database (the one thing a test cannot wait for is an hour).
- A request slower than its model's `timeout` gets a `request_timeout` line in the error file.
"""

from __future__ import annotations

import json
import sqlite3
import urllib.request
from pathlib import Path

import pytest
from acceptance_settings import FAST_ENV
from durability import write_config
from openai import NotFoundError, OpenAI
from polling import poll
from sdk_helpers import chat_line, jsonl, read_jsonl, submit, wait_batch

from backfill.testing import UpstreamProcess
from backfill.testing.server import BackfillProcess

KEY = "sk-acceptance-partial"


def start(
    tmp_path: Path,
    upstream: UpstreamProcess,
    servers: list[BackfillProcess],
    env: dict[str, str] | None = None,
    timeout: float | None = None,
) -> tuple[BackfillProcess, OpenAI]:
    config = write_config(tmp_path / "backfill.toml", upstream, timeout=timeout)
    if timeout is not None:  # one attempt: a timeout is final, not retried with backoff
        config.write_text(config.read_text() + "attempts = 1\n")
    proc = BackfillProcess(
        tmp_path / "data",
        api_keys=[KEY],
        extra_args=["--config", str(config)],
        env={**FAST_ENV, "BACKFILL_SHARD_SIZE": "4", **(env or {})},
    )
    servers.append(proc)
    proc.start()
    return proc, OpenAI(base_url=proc.base_url, api_key=KEY, max_retries=1, timeout=15.0)


def partial(proc: BackfillProcess, batch_id: str, kind: str = "output") -> tuple[str, list[str]]:
    req = urllib.request.Request(
        f"{proc.base_url}/batches/{batch_id}/output?kind={kind}",
        headers={"Authorization": f"Bearer {KEY}"},
    )
    with urllib.request.urlopen(req, timeout=15.0) as resp:
        assert resp.status == 200
        return resp.headers["x-backfill-complete"], resp.read().decode().splitlines()


def test_partial_output_while_running_then_the_final_file(
    tmp_path: Path, upstream: UpstreamProcess, servers: list[BackfillProcess]
) -> None:
    proc, client = start(tmp_path, upstream, servers)
    ids = [f"p{i:02d}" for i in range(16)]
    slow = set(ids[3::4])  # one per shard of 4: every shard stays open while the rest finish
    failing = {"p05"}

    def text(cid: str) -> str:
        return (
            cid + (" #sleep:4000" if cid in slow else "") + (" #fail400" if cid in failing else "")
        )

    batch = submit(client, [chat_line(cid, text(cid)) for cid in ids])
    quick = len(ids) - len(slow)
    running = poll(
        lambda: client.batches.retrieve(batch.id),
        lambda b: (
            b.request_counts is not None
            and b.request_counts.completed + b.request_counts.failed >= quick
        ),
        what="the quick requests to be recorded",
    )
    assert running.status == "in_progress", running
    complete, snapshot = partial(proc, batch.id)
    complete_err, snapshot_err = partial(proc, batch.id, "error")
    assert (complete, complete_err) == ("false", "false")
    assert 0 < len(snapshot) < len(ids) - len(failing)
    assert len(snapshot_err) == 1 and '"p05"' in snapshot_err[0]

    done = wait_batch(client, batch.id)
    assert done.status == "completed", done
    assert done.output_file_id is not None and done.error_file_id is not None
    final = client.files.content(done.output_file_id).text.splitlines()
    final_err = client.files.content(done.error_file_id).text.splitlines()
    assert set(snapshot) <= set(final)  # what was shown early is durable, byte for byte
    assert set(snapshot_err) <= set(final_err)
    shown = {json.loads(line)["custom_id"] for line in snapshot}
    assert shown <= set(ids) - slow - failing  # only finished requests, never a slow one

    complete, after = partial(proc, batch.id)
    assert complete == "true" and after == final
    complete, after_err = partial(proc, batch.id, "error")
    assert complete == "true" and after_err == final_err
    assert [o["custom_id"] for o in read_jsonl(client, done.output_file_id)] == [
        c for c in ids if c not in failing
    ]


def _expire_now(data_dir: Path, *file_ids: str) -> None:
    """Time travel: make the files' recorded `expires_at` lie in the past."""
    with sqlite3.connect(data_dir / "backfill.db", timeout=30) as db:
        db.executemany("UPDATE files SET expires_at = 1 WHERE id = ?", [(f,) for f in file_ids])


def _blob(data_dir: Path, file_id: str) -> Path:
    with sqlite3.connect(data_dir / "backfill.db", timeout=30) as db:
        (path,) = db.execute("SELECT blob_path FROM files WHERE id = ?", (file_id,)).fetchone()
    return data_dir / "blobs" / path


def _gone(client: OpenAI, file_id: str) -> bool:
    try:
        client.files.retrieve(file_id)
    except NotFoundError:
        return True
    return False


def test_retention_deletes_expired_files_but_keeps_inputs_of_running_batches(
    tmp_path: Path, upstream: UpstreamProcess, servers: list[BackfillProcess]
) -> None:
    proc, client = start(tmp_path, upstream, servers, env={"BACKFILL_RETENTION_INTERVAL": "0.2"})
    data = proc.data_dir
    loose = client.files.create(
        file=("loose.jsonl", jsonl([chat_line("x", "x")])),
        purpose="batch",
        expires_after={"anchor": "created_at", "seconds": 3600},
    )
    assert loose.expires_at == loose.created_at + 3600
    batch = submit(client, [chat_line(f"s{i}", f"s{i} #sleep:2500") for i in range(4)])
    wait_batch(client, batch.id, statuses={"in_progress"})
    loose_blob, input_blob = _blob(data, loose.id), _blob(data, batch.input_file_id)
    assert loose_blob.exists() and input_blob.exists()

    _expire_now(data, loose.id, batch.input_file_id)
    # the pass that deletes the loose file has looked at the running batch's input too
    poll(lambda: _gone(client, loose.id), bool, what="retention to delete the loose file")
    assert not loose_blob.exists()
    with pytest.raises(NotFoundError):
        client.files.content(loose.id)
    assert client.batches.retrieve(batch.id).status == "in_progress"
    assert client.files.retrieve(batch.input_file_id).id == batch.input_file_id
    assert input_blob.exists()

    done = wait_batch(client, batch.id)
    assert done.status == "completed", done
    poll(lambda: _gone(client, batch.input_file_id), bool, what="the finished input to go")
    assert not input_blob.exists()
    # the batch and its results are untouched by its input's retention
    assert done.output_file_id is not None
    assert len(read_jsonl(client, done.output_file_id)) == 4
    assert client.batches.retrieve(batch.id).status == "completed"


def test_request_slower_than_the_model_timeout_gets_request_timeout(
    tmp_path: Path, upstream: UpstreamProcess, servers: list[BackfillProcess]
) -> None:
    _, client = start(tmp_path, upstream, servers, timeout=0.5)
    batch = submit(
        client,
        [chat_line("ok", "fast"), chat_line("late", "late #sleep:5000"), chat_line("ok2", "x")],
    )
    done = wait_batch(client, batch.id)
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 1)
    assert done.output_file_id is not None and done.error_file_id is not None
    assert [o["custom_id"] for o in read_jsonl(client, done.output_file_id)] == ["ok", "ok2"]
    (late,) = read_jsonl(client, done.error_file_id)
    assert late["custom_id"] == "late"
    assert late["response"] is None
    assert late["error"]["code"] == "request_timeout"
