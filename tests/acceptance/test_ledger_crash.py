"""The usage ledger through `kill -9`: three kills of `backfill serve` while a batch runs and
three while it is being finalized, on SQLite and on PostgreSQL.

What must hold (issue 15): after the batch completes, the ledger's entries for it add up to
exactly the `usage` of its output lines (input, cached, output and reasoning tokens), its
request count is the number of lines, each recorded segment has exactly one entry, and the
batch's `cost` extension is the sum of the entries' prices. Re-run lines after a kill, a
checkpoint retried after its commit landed, and a finalization started over must never count
twice; work lost with a killed process must not be counted either.

A kill "during finalization" is a kill while the finalizer is writing the output file: a new
staging file of it (`files/<id>#<n>`, obstore's local staging) is in the blob folder. Output
lines are made a few KB long so that writing them takes long enough to be caught.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from acceptance_settings import FAST_ENV
from durability import CRASH_ENV, TaggedBatch, client_for, kill_points, progress, wait_progress
from openai import OpenAI
from openai.types import Batch
from polling import poll
from sdk_helpers import chat_line, read_jsonl, submit, wait_batch
from test_postgres_scaleout import postgres_url  # noqa: F401 (the scratch database fixture)

from backfill.domain.usage import BATCH, UsageEntry
from backfill.store.sql import SqlStore
from backfill.testing import UpstreamProcess
from backfill.testing.server import BackfillProcess

KEY = "sk-acceptance-ledger-crash"
SEED = 15_000_015
LINES = 3000
PAD = 3000  # characters of one word per request text: the echo repeats it in the answer
# $0.15 input / $0.60 output per million tokens, half off for batches
PRICES = "\n[prices.m]\ninput = 0.15\noutput = 0.60\nbatch_discount = 0.5\n"


class PaddedBatch(TaggedBatch):
    def lines(self) -> list[dict[str, Any]]:
        pad = "x" * PAD
        return [
            chat_line(cid, f"{self.tag} {cid} {pad} #sleep:{self.sleep_ms}", max_tokens=4)
            for cid in self.ids
        ]


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'data' / 'backfill.db'}"
    else:
        yield request.getfixturevalue("postgres_url")


def ledger_of(database: str, batch_id: str) -> tuple[list[UsageEntry], int]:
    """Every ledger entry of the batch (page by page) and its count of recorded segments."""
    store = SqlStore(database)
    try:
        entries: list[UsageEntry] = []
        while page := store.usage_entries(
            batch_id=batch_id, after_seq=entries[-1].seq if entries else 0, limit=500
        ):
            entries += page
        return entries, len(store.segments(batch_id))
    finally:
        store.close()


def staging_files(blobs: Path) -> set[tuple[str, int]]:
    """Staging files of result files being written (name, inode: a kill leaves them behind)."""
    folder = blobs / "files"
    if not folder.is_dir():
        return set()
    found = set()
    for entry in os.scandir(folder):
        if "#" in entry.name:
            try:
                found.add((entry.name, entry.inode()))
            except OSError:
                continue  # renamed into place meanwhile
    return found


def assert_ledger_is_the_output(
    client: OpenAI, done: Batch, entries: list[UsageEntry], segments: int
) -> dict[str, int]:
    assert done.status == "completed", done
    assert done.output_file_id is not None
    out = read_jsonl(client, done.output_file_id)
    err = read_jsonl(client, done.error_file_id) if done.error_file_id else []
    assert len(out) + len(err) == LINES
    want = {"input": 0, "cached": 0, "output": 0, "reasoning": 0}
    for line in out + err:
        body = (line.get("response") or {}).get("body") or {}
        usage = body.get("usage") or {}
        want["input"] += usage.get("prompt_tokens", 0)
        want["cached"] += (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        want["output"] += usage.get("completion_tokens", 0)
        want["reasoning"] += (usage.get("completion_tokens_details") or {}).get(
            "reasoning_tokens", 0
        )
    got = {
        "input": sum(e.input_tokens for e in entries),
        "cached": sum(e.cached_tokens for e in entries),
        "output": sum(e.output_tokens for e in entries),
        "reasoning": sum(e.reasoning_tokens for e in entries),
    }
    assert got == want, (got, want)
    assert want["input"] > 0 and want["output"] > 0
    assert sum(e.requests for e in entries) == len(out) + len(err)
    # one entry per recorded segment, each once
    assert len({e.ref for e in entries}) == len(entries) == segments
    assert {(e.kind, e.model, e.endpoint) for e in entries} == {
        (BATCH, "m", "/v1/chat/completions")
    }
    assert None not in {e.api_key_id for e in entries}
    assert sum(e.engine_ms for e in entries) >= 2 * LINES  # each request sleeps 2 ms upstream
    # the batch object tells the same: usage, and cost as the sum of the priced entries
    assert done.usage is not None
    assert (done.usage.input_tokens, done.usage.output_tokens) == (want["input"], want["output"])
    billed = sum(e.cost_micros for e in entries)
    listed = sum(e.list_micros for e in entries)
    # half of (input x 0.15 + output x 0.60) per entry, rounded per entry: within one
    # micro-unit per entry of the exact total
    exact_list = (15 * want["input"] + 60 * want["output"]) / 100
    assert abs(listed - exact_list) <= len(entries) / 2 + 1e-9
    assert abs(billed - exact_list / 2) <= len(entries) / 2 + 1e-9
    assert done.model_extra is not None
    assert done.model_extra["cost"] == {
        "amount": {"value": billed / 10**6, "currency": "usd"},
        "realtime_equivalent": {"value": listed / 10**6, "currency": "usd"},
    }
    return {**got, "requests": len(out) + len(err), "entries": len(entries), "micros": billed}


def test_ledger_equals_the_output_after_kills_while_running_and_finalizing(
    tmp_path: Path,
    database: str,
    upstream: UpstreamProcess,
    servers: list[BackfillProcess],
) -> None:
    config = tmp_path / "backfill.toml"
    config.write_text(f'[models.m]\nurl = "{upstream.url}"\nmax_concurrency = 16\n{PRICES}')
    data = tmp_path / "data"
    blobs = tmp_path / "blobs"
    args = ["--config", str(config), "--database", database, "--storage", str(blobs)]

    def start() -> BackfillProcess:
        proc = BackfillProcess(data, api_keys=[KEY], extra_args=args, env={**FAST_ENV, **CRASH_ENV})
        servers.append(proc)
        return proc.start()

    def running(p: BackfillProcess) -> bool:
        return p.proc is not None and p.proc.poll() is None

    work = PaddedBatch(LINES, sleep_ms=2)
    proc = start()
    client = client_for(proc.base_url, KEY)
    batch = submit(client, work.lines())

    # three kills while it runs, at seeded moments
    at_kill: list[int] = []
    for fraction in kill_points(SEED, low=0.1, high=0.7):
        target = max(int(fraction * LINES), (at_kill or [0])[-1] + 100)
        now = wait_progress(client, batch.id, target, lambda p=proc: running(p))
        assert now.status == "in_progress", (now, proc.logs())
        proc.kill()
        at_kill.append(progress(now))
        proc = start()
        client = client_for(proc.base_url, KEY)

    # three kills while the output file is being written
    finalize_kills = 0
    for _ in range(3):
        before = staging_files(blobs)

        def writing(p: BackfillProcess = proc, old: set[tuple[str, int]] = before) -> bool:
            return bool(staging_files(blobs) - old) or not running(p)

        poll(writing, timeout=120, interval=0.002, what="the finalizer to write the output")
        assert running(proc), proc.logs()
        proc.kill()
        finalize_kills += 1
        status = SqlStore(database)
        try:
            record = status.get_batch(batch.id)
        finally:
            status.close()
        assert record is not None and record.status == "finalizing", record
        proc = start()
        client = client_for(proc.base_url, KEY)

    done = wait_batch(client, batch.id, timeout=120)
    entries, segments = ledger_of(database, batch.id)
    figures = assert_ledger_is_the_output(client, done, entries, segments)
    print(
        f"\nledger through kill -9 ({database.split(':')[0]}): killed at recorded progress "
        f"{at_kill} of {LINES}, then {finalize_kills} times while finalizing; ledger {figures}"
    )
