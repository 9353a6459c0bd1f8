"""The governor on by default, on an engine without metrics that runs one request at a time.

`backfill serve` in front of `backfill sim --no-metrics --max-num-seqs 1` (its `/metrics` a
404, one sequence at a time, the rest queued in arrival order: llama-cpp-python's server, or
llama-server with one slot), the model configured with no `governor` key. A batch runs; then
real-time requests stream through the gateway; then none. Read from backfill's `/metrics` and
its log, polled with deadlines (no timing assertions):

- batch alone: the governor is dormant, the batch at its ceiling;
- real time: the limit falls (to the floor here: each streamed request waits behind the batch
  requests ahead of it, which only TTFT shows), batch requests are shed, and the TTFT cap is
  shown;
- no real time for `idle_after`: the limit is back at the ceiling;
- every batch line has exactly one outcome (shed requests are re-sent, never failed), and the
  log says once that the governor runs on the gateway's latencies alone.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI
from polling import poll

from backfill.metrics import parse
from backfill.sim import SimProcess, start_sim
from backfill.testing.server import BackfillProcess

KEY = "sk-no-metrics"
CEILING = 16
LINES = 240
MODEL = "llama"


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    with start_sim(speedup=10, max_num_seqs=1, metrics=False) as s:
        yield s


def served_metrics(bf: BackfillProcess) -> dict[str, float]:
    root = bf.base_url.removesuffix("/v1")
    with urllib.request.urlopen(root + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        key.removesuffix(f'{{model="{MODEL}"}}'): value
        for key, value in parse(text, drop_labels=()).items()
        if key.endswith(f'{{model="{MODEL}"}}')
    }


def stream_once(client: OpenAI, i: int) -> None:
    chunks = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": f"real time {i}"}],
        max_tokens=8,
        stream=True,
    )
    assert any(chunk.choices and chunk.choices[0].finish_reason for chunk in chunks)


def test_no_metrics_one_slot_dormant_then_floor_then_ceiling(
    sim: SimProcess, tmp_path: Path
) -> None:
    config = tmp_path / "backfill.toml"
    config.write_text(
        f'[models.{MODEL}]\nurl = "{sim.url}"\nupstream_name = "{sim.model_name}"\n'
        f"max_concurrency = {CEILING}\n"  # no `governor`: the default
    )
    batch = tmp_path / "batch.jsonl"
    with batch.open("w") as fh:
        for i in range(LINES):
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"batch {i} " + "w " * 30}],
                "max_tokens": 40,
            }
            line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions"}
            fh.write(json.dumps({**line, "body": body}) + "\n")
    env = {
        "BACKFILL_GOVERNOR_IDLE_SECONDS": "1",
        "BACKFILL_REALTIME_RPM": "0",
        "BACKFILL_SCHEDULER_INTERVAL": "0.1",
        "BACKFILL_FLUSH_EVERY_SECONDS": "0.2",
        "BACKFILL_SHARD_SIZE": "60",
    }
    args = ["--config", str(config)]
    with BackfillProcess(tmp_path / "data", api_keys=[KEY], extra_args=args, env=env) as bf:
        client = OpenAI(base_url=bf.base_url, api_key=KEY, max_retries=2, timeout=60)
        uploaded = client.files.create(file=batch.open("rb"), purpose="batch")
        created = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )

        # a batch alone: dormant, at the ceiling, as without a governor
        alone = poll(
            lambda: served_metrics(bf),
            lambda m: m.get("backfill_batch_in_flight", 0) >= CEILING / 2,
            what="the batch running",
        )
        assert alone["backfill_governor_dormant"] == 1.0
        assert alone["backfill_batch_limit"] == CEILING
        assert alone["backfill_governor_engine_metrics"] == 0.0
        assert "backfill_governor_ttft_cap" not in alone

        # real time streams through the gateway, one user after another
        stop = threading.Event()
        errors: list[BaseException] = []

        def user() -> None:
            i = 0
            while not stop.is_set():
                try:
                    stream_once(client, i)
                except BaseException as exc:  # reported below
                    errors.append(exc)
                    return
                i += 1

        thread = threading.Thread(target=user)
        thread.start()
        try:
            during = poll(
                lambda: served_metrics(bf),
                lambda m: (
                    m["backfill_batch_limit"] < CEILING
                    and m.get("backfill_batch_shed_total", 0) > 0
                    and "backfill_governor_ttft_cap" in m
                ),
                what="the limit down and batch requests shed once real time came",
            )
            assert during["backfill_governor_dormant"] == 0.0
            low = poll(
                lambda: served_metrics(bf),
                lambda m: m["backfill_batch_limit"] <= 2,
                what="the batch near the floor while real time queues behind it",
            )
            assert low["backfill_governor_idle"] == 0.0
        finally:
            stop.set()
            thread.join(120)
        assert not errors, errors

        # no real time for idle_after: back at the ceiling
        back = poll(
            lambda: served_metrics(bf),
            lambda m: m["backfill_governor_idle"] == 1.0 and m["backfill_batch_limit"] == CEILING,
            what="the governor idle again, the limit grown back to the ceiling",
        )
        assert back["backfill_governor_dormant"] == 0.0  # awake for good

        done = poll(
            lambda: client.batches.retrieve(created.id),
            lambda b: b.status in ("completed", "failed", "expired", "cancelled"),
            what="the batch finished",
            timeout=300,
        )
        assert done.status == "completed", done
        outcomes: list[str] = []
        for file_id in (done.output_file_id, done.error_file_id):
            if file_id:
                text = client.files.content(file_id).text
                outcomes += [json.loads(line)["custom_id"] for line in text.splitlines()]
        assert sorted(outcomes) == sorted(f"r{i}" for i in range(LINES))  # one each
        assert done.request_counts is not None and done.request_counts.failed == 0
        log = bf.log_path.read_text(errors="replace")
    assert log.count(f"governor for {MODEL}: on the gateway's latencies alone") == 1, log
    assert log.count(f"governor for {MODEL}: awake (first real-time request)") == 1, log
