"""Cancel grace vs. leases: a cancelled batch's counts and files never change afterwards."""

from __future__ import annotations

import time
from pathlib import Path

from acceptance_settings import FAST_ENV
from openai import OpenAI
from polling import poll
from sdk_helpers import chat_line, read_jsonl, submit, wait_batch

from backfill.testing import UpstreamProcess
from backfill.testing.server import BackfillProcess

KEY = "sk-acceptance-grace"


def test_results_finishing_in_the_grace_period_are_not_lost_or_counted_twice(
    tmp_path: Path, upstream: UpstreamProcess, servers: list[BackfillProcess]
) -> None:
    """In-flight requests may finish within `cancel_grace_seconds` and their results are kept.
    The grace here (3 s) is longer than the lease (1 s): the run must keep its lease (or the
    scheduler must wait) so the batch is not finalized while results are still coming in."""
    proc = BackfillProcess(
        tmp_path,
        api_keys=[KEY],
        models=[f"m={upstream.url}"],
        env={
            **FAST_ENV,
            "BACKFILL_SHARD_SIZE": "10",
            "BACKFILL_LEASE_SECONDS": "1",
            "BACKFILL_CANCEL_GRACE_SECONDS": "3",
        },
    )
    servers.append(proc)
    proc.start()
    client = OpenAI(base_url=proc.base_url, api_key=KEY, max_retries=1, timeout=15.0)

    ids = ["fast-0", "slow-1", "fast-2", "slow-3"]
    lines = [chat_line(c, c + (" #sleep:1500" if c.startswith("slow") else "")) for c in ids]
    batch = submit(client, lines)
    poll(
        lambda: client.batches.retrieve(batch.id),
        lambda b: b.request_counts is not None and b.request_counts.completed == 2,
        what="the fast requests to be recorded",
    )
    client.batches.cancel(batch.id)
    done = wait_batch(client, batch.id, timeout=20)
    assert done.status == "cancelled", done

    # Watch the finished batch for longer than the slow requests take: nothing may move.
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        now = client.batches.retrieve(batch.id)
        assert now.request_counts == done.request_counts, (done.request_counts, now)
        time.sleep(0.1)

    assert done.request_counts is not None
    counts = done.request_counts
    assert counts.completed + counts.failed == counts.total == 4
    output = read_jsonl(client, done.output_file_id or "") if done.output_file_id else []
    errors = read_jsonl(client, done.error_file_id or "") if done.error_file_id else []
    assert len(output) == counts.completed
    assert len(errors) == counts.failed
    assert sorted(o["custom_id"] for o in output + errors) == sorted(ids)
    # the slow ones finish 1.5 s after they start, inside the 3 s grace: they are kept
    assert [o["custom_id"] for o in output] == ids
