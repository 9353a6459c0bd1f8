"""Helpers of the durability tests (kill -9, many workers): batches big enough to kill in the
middle, kill points, the exactly-once check and duplicate counting at the upstream.

Duplicates are counted where they would cost money: the upstream's `/stats` `by_text` counts
how often it was sent each request text. Every text carries a per-test tag, so a shared
upstream's other traffic never counts.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openai import OpenAI
from openai.types import Batch
from polling import poll
from sdk_helpers import chat_line, read_jsonl

from backfill.testing import UpstreamProcess

#: the flush cadence and concurrency the duplicate bound is computed from
MAX_CONCURRENCY = 16
FLUSH_EVERY_REQUESTS = 25
WORKER_SHARDS = 2

CRASH_ENV = {
    "BACKFILL_SHARD_SIZE": "1000",
    "BACKFILL_WORKER_SHARDS": str(WORKER_SHARDS),
    "BACKFILL_FLUSH_EVERY_REQUESTS": str(FLUSH_EVERY_REQUESTS),
    "BACKFILL_FLUSH_EVERY_SECONDS": "0.1",
    "BACKFILL_SCHEDULER_INTERVAL": "0.1",
    "BACKFILL_LEASE_SECONDS": "2",
    "BACKFILL_CANCEL_GRACE_SECONDS": "0.2",
}

#: requests one kill may make the upstream see twice: those in flight (the model's window) plus
#: those answered but not yet in a recorded segment (each running shard's buffer, which may
#: grow up to twice the flush threshold while a flush is being written)
PER_KILL_BOUND = MAX_CONCURRENCY + WORKER_SHARDS * 2 * FLUSH_EVERY_REQUESTS


def write_config(
    path: Path,
    upstream: UpstreamProcess,
    *,
    max_concurrency: int = MAX_CONCURRENCY,
    timeout: float | None = None,
    api_key: str | None = None,
) -> Path:
    lines = []
    if api_key:
        lines += ["[server]", f'api_keys = ["{api_key}"]', ""]
    lines += ["[models.m]", f'url = "{upstream.url}"', f"max_concurrency = {max_concurrency}"]
    if timeout is not None:
        lines.append(f"timeout = {timeout}")
    path.write_text("\n".join(lines) + "\n")
    return path


def client_for(base_url: str, key: str) -> OpenAI:
    return OpenAI(base_url=base_url, api_key=key, max_retries=2, timeout=30.0)


@dataclass
class TaggedBatch:
    """A batch of `n` chat requests whose texts all carry a fresh tag."""

    n: int
    sleep_ms: int = 5
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:10])

    @property
    def ids(self) -> list[str]:
        return [f"r{i:05d}" for i in range(self.n)]

    def lines(self) -> list[dict[str, Any]]:
        return [
            chat_line(cid, f"{self.tag} {cid} #sleep:{self.sleep_ms}", max_tokens=4)
            for cid in self.ids
        ]

    def seen(self, upstream: UpstreamProcess) -> dict[str, int]:
        """How often the upstream was sent each of this batch's texts."""
        by_text: dict[str, int] = upstream.stats(timeout=30)["by_text"]
        return {t: c for t, c in by_text.items() if t.startswith(self.tag)}


def kill_points(seed: int, n: int = 3, low: float = 0.1, high: float = 0.9) -> list[float]:
    """`n` seeded random progress fractions in [low, high], ascending."""
    rng = random.Random(seed)
    return sorted(rng.uniform(low, high) for _ in range(n))


def progress(batch: Batch) -> int:
    counts = batch.request_counts
    return 0 if counts is None else counts.completed + counts.failed


def wait_progress(
    client: OpenAI, batch_id: str, at_least: int, alive: Callable[[], bool], timeout: float = 60
) -> Batch:
    """Poll the batch until `at_least` requests are recorded (or it is over, or the process
    doing the work died)."""
    return poll(
        lambda: client.batches.retrieve(batch_id),
        lambda b: (
            progress(b) >= at_least or b.status not in ("validating", "in_progress") or not alive()
        ),
        timeout=timeout,
        interval=0.02,
        what=f"{at_least} requests of {batch_id} to be recorded",
    )


def new_reruns(before: dict[str, int], after: dict[str, int]) -> int:
    """Requests sent again, between two snapshots, whose text had been sent before the first."""
    return sum(after.get(t, 0) - c for t, c in before.items() if c >= 1)


def assert_exactly_once(client: OpenAI, batch: Batch, ids: list[str]) -> None:
    """Completed, every custom_id exactly once across output + error files, all succeeded."""
    assert batch.status == "completed", batch
    counts = batch.request_counts
    assert counts is not None
    assert (counts.total, counts.completed, counts.failed) == (len(ids), len(ids), 0), counts
    assert batch.output_file_id is not None
    out = read_jsonl(client, batch.output_file_id)
    err = read_jsonl(client, batch.error_file_id) if batch.error_file_id else []
    seen = [o["custom_id"] for o in out + err]
    assert len(seen) == len(set(seen)), "a custom_id appears twice"
    assert sorted(seen) == sorted(ids)
    assert [o["custom_id"] for o in out] == ids  # input order
    assert all(o["response"]["status_code"] == 200 for o in out)
    assert len({o["id"] for o in out}) == len(ids)
