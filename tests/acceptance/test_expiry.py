"""A batch whose window passes: `expired`, finished results kept, the rest `batch_expired`."""

from __future__ import annotations

from pathlib import Path

from acceptance_settings import FAST_ENV
from openai import OpenAI
from sdk_helpers import CHAT, chat_line, jsonl, read_jsonl, upload, wait_batch

from backfill.testing import UpstreamProcess
from backfill.testing.server import BackfillProcess

KEY = "sk-acceptance-expiry"


def test_expired_batch_keeps_finished_results(
    tmp_path: Path, upstream: UpstreamProcess, servers: list[BackfillProcess]
) -> None:
    proc = BackfillProcess(
        tmp_path,
        api_keys=[KEY],
        models=[f"m={upstream.url}"],
        env={**FAST_ENV, "BACKFILL_MIN_COMPLETION_WINDOW": "1"},
    )
    servers.append(proc)
    proc.start()
    client = OpenAI(base_url=proc.base_url, api_key=KEY, max_retries=1, timeout=15.0)

    ids = [f"e{i}" for i in range(6)]
    fast = ids[::2]
    slow = ids[1::2]
    lines = [chat_line(c, c + (" #sleep:30000" if c in slow else "")) for c in ids]
    file = upload(client, jsonl(lines))
    batch = client.batches.create(
        input_file_id=file.id,
        endpoint=CHAT,
        completion_window="2s",  # type: ignore[arg-type]
    )
    assert batch.expires_at == batch.created_at + 2

    done = wait_batch(client, batch.id, timeout=20)
    assert done.status == "expired", done
    assert done.expired_at is not None and done.expired_at >= done.created_at + 2
    assert done.completed_at is None
    assert done.request_counts is not None
    counts = done.request_counts
    assert (counts.total, counts.completed, counts.failed) == (6, 3, 3)
    assert done.output_file_id is not None and done.error_file_id is not None
    assert [o["custom_id"] for o in read_jsonl(client, done.output_file_id)] == fast
    errors = read_jsonl(client, done.error_file_id)
    assert [e["custom_id"] for e in errors] == slow
    for e in errors:
        assert e["response"] is None
        assert e["error"]["code"] == "batch_expired"
