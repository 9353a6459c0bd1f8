"""backfill steering real vLLM: batch requests carry `priority` so that vLLM (started with
`--scheduling-policy priority`) serves real time first, and the governor reads vLLM's own
`/metrics` (real-time load that never passes through backfill included).

No timing is asserted: the priority test counts how many batch requests had finished when a
real-time request that arrived behind a queue of them got its first token, and the governor
test reads what backfill says it last read from vLLM."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest
from openai import OpenAI
from polling import poll
from sdk_helpers import TERMINAL, chat_line, submit
from vllm_tier import KEY, MAX_NUM_SEQS, MODEL, backfill_for

from backfill.testing.server import BackfillProcess
from backfill.testing.vllm import VllmProcess


def _backfill_metric(server: BackfillProcess, name: str) -> float | None:
    """One `backfill_*{model="tiny"}` sample from backfill's own `/metrics`, None if absent."""
    text = httpx.get(
        server.base_url.removesuffix("/v1") + "/metrics",
        headers={"authorization": f"Bearer {KEY}"},
        timeout=10,
    ).text
    for line in text.splitlines():
        if line.startswith(f'{name}{{model="{MODEL}"}} '):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[BackfillProcess]]:
    procs: list[BackfillProcess] = []
    yield procs
    for proc in procs:
        proc.stop()


def test_real_time_overtakes_queued_batch_requests(
    tmp_path: Path, vllm: VllmProcess, started: list[BackfillProcess]
) -> None:
    # the governor is off so that only vLLM's scheduler decides who runs next, and so are hot
    # prefix groups: their warm-up would send one of these same-prompt requests first and
    # hold the rest, and the test needs the whole batch queued at vLLM at once
    rounds = 6
    batch_size = rounds * MAX_NUM_SEQS
    options = (
        f"priority = true\ngovernor = false\nhot_groups = false\nmax_concurrency = {batch_size}"
    )
    server = backfill_for(tmp_path / "priority", vllm, model_options=options)
    started.append(server.start())
    client = OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=120)
    lines = [
        chat_line(f"b{i}", "summarize this document", MODEL, max_tokens=600, ignore_eos=True)
        for i in range(batch_size)
    ]
    batch = submit(client, lines)
    # every batch request sent to vLLM: MAX_NUM_SEQS running, the rest queued behind them
    # (backfill's own figures: vLLM's /metrics can lag by seconds while it is busy)
    poll(
        lambda: _backfill_metric(server, "backfill_batch_in_flight"),
        lambda n: n == batch_size,
        what="the whole batch at vLLM",
        timeout=120,
    )
    before = client.batches.retrieve(batch.id).request_counts
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=4,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    next(iter(stream))  # the first event: vLLM has scheduled the real-time request
    after = client.batches.retrieve(batch.id).request_counts
    stream.close()
    assert before is not None and after is not None
    queued = batch_size - before.completed - MAX_NUM_SEQS
    assert queued >= 3 * MAX_NUM_SEQS, f"only {queued} batch requests queued: machine too slow"
    # the batch requests finish in rounds of MAX_NUM_SEQS. First come, first served, real
    # time would wait behind all the queued ones; at a lower priority number it takes the
    # first free seat: after the round running when it arrived (or the next, if that one
    # ended while the request was on its way)
    went_first = after.completed - before.completed
    assert went_first <= 2 * MAX_NUM_SEQS, f"{went_first} batch requests went first ({queued=})"
    done = poll(
        lambda: client.batches.retrieve(batch.id),
        lambda b: b.status in TERMINAL,
        what="the priority batch to end",
        timeout=300,
    )
    assert done.status == "completed" and done.request_counts is not None
    assert done.request_counts.completed == batch_size


def _direct_load(vllm: VllmProcess, stop: threading.Event, errors: list[str]) -> None:
    """Real-time traffic straight to vLLM, never through backfill: only vLLM's metrics show it."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "tell me a story"}],
        "max_tokens": 400,
        "ignore_eos": True,
    }
    with httpx.Client(timeout=120) as http:
        while not stop.is_set():
            response = http.post(vllm.url + "/chat/completions", json=body)
            if response.status_code != 200:
                errors.append(response.text)
                return


def test_governor_reads_vllm_metrics(
    tmp_path: Path, vllm: VllmProcess, started: list[BackfillProcess]
) -> None:
    server = backfill_for(
        tmp_path / "governed", vllm, model_options="priority = true\nmax_concurrency = 16"
    )
    started.append(server.start())
    # the governor is on by itself: vLLM serves Prometheus metrics, which backfill reads
    poll(
        lambda: _backfill_metric(server, "backfill_governor_engine_metrics"),
        lambda on: on == 1.0,
        what="backfill to govern on vLLM's metrics",
    )
    assert _backfill_metric(server, "backfill_engine_requests_running") == 0.0
    assert _backfill_metric(server, "backfill_engine_kv_cache_usage") is not None

    stop = threading.Event()
    errors: list[str] = []
    threads = [
        threading.Thread(target=_direct_load, args=(vllm, stop, errors), daemon=True)
        for _ in range(MAX_NUM_SEQS)  # (the policy allows 2 sequences of slack in its count)
    ]
    for thread in threads:
        thread.start()
    try:
        # backfill sees the real-time load it never carried, from vLLM's own running count,
        # and plans for it: no longer idle, a real-time peak to keep room for
        running = poll(
            lambda: _backfill_metric(server, "backfill_engine_requests_running"),
            lambda n: n is not None and n >= 1,
            what="backfill to read vLLM's running requests",
        )
        assert running is not None and running <= MAX_NUM_SEQS
        poll(
            lambda: _backfill_metric(server, "backfill_governor_reference"),
            lambda peak: peak is not None and peak >= 1,
            what="the governor to plan for the real-time load it read from vLLM",
        )
        assert _backfill_metric(server, "backfill_governor_idle") == 0.0
        # a batch beside it still completes, every line once
        client = OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=60)
        lines = [chat_line(f"g{i}", "hello world", MODEL, max_tokens=20) for i in range(24)]
        batch = submit(client, lines)
        done = poll(
            lambda: client.batches.retrieve(batch.id),
            lambda b: b.status in TERMINAL,
            what="the governed batch to end",
            timeout=300,
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(120)
    assert errors == []
    assert done.status == "completed" and done.output_file_id is not None
    ids = [
        json.loads(r)["custom_id"]
        for r in client.files.content(done.output_file_id).text.splitlines()
    ]
    assert ids == [f"g{i}" for i in range(24)]
