"""Per-replica figures on `GET /metrics`: a real `backfill serve` over echo upstreams.

Model `r` is served by three replicas (`--model r=URL1,URL2,URL3`), model `solo` by one. A
batch of each runs to completion; then backfill's `/metrics` has, for `r`, one series per
replica labelled with its URL, whose `backfill_replica_sent_total` is what that upstream itself
counted and sums to the batch's requests (no failures: one attempt each), with nothing left in
flight, no error and none drained; `solo` has batch series but no replica series.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families
from sdk_helpers import chat_line, submit, wait_batch
from suite_settings import SERVER_ENV

from backfill.testing import UpstreamProcess, start_upstream
from backfill.testing.server import BackfillProcess

KEY = "sk-replica-metrics"
LINES = 24  # SERVER_ENV allows 25 lines a batch


@pytest.fixture
def upstreams() -> Iterator[list[UpstreamProcess]]:
    started: list[UpstreamProcess] = []
    try:
        for _ in range(4):
            started.append(start_upstream())
        yield started
    finally:
        for upstream in started:
            upstream.stop()


def scrape(bf: BackfillProcess) -> dict[str, dict[tuple[str, str], float]]:
    """`{sample name: {(model, replica or ""): value}}` of backfill's `/metrics`."""
    with urllib.request.urlopen(bf.base_url.removesuffix("/v1") + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, dict[tuple[str, str], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.labels.get("model", ""), sample.labels.get("replica", ""))
            out.setdefault(sample.name, {})[key] = sample.value
    return out


def test_replica_figures_per_model_and_replica(
    tmp_path: Path, upstreams: list[UpstreamProcess]
) -> None:
    replicas, solo = upstreams[:3], upstreams[3]
    urls = [u.url for u in replicas]
    models = ["r=" + ",".join(urls), f"solo={solo.url}"]
    with BackfillProcess(tmp_path / "data", api_keys=[KEY], models=models, env=SERVER_ENV) as bf:
        client = OpenAI(base_url=bf.base_url, api_key=KEY, max_retries=1, timeout=15.0)
        batches = [
            submit(client, [chat_line(f"{m}-{i}", f"hello {m} {i}", model=m) for i in range(n)])
            for m, n in (("r", LINES), ("solo", 5))
        ]
        for batch in batches:
            done = wait_batch(client, batch.id)
            assert done.status == "completed", (done, bf.logs())
            assert done.request_counts is not None and done.request_counts.failed == 0
        figures = scrape(bf)

    sent = figures["backfill_replica_sent_total"]
    assert sorted(sent) == sorted(("r", url) for url in urls), figures
    counted = [u.stats()["requests"] for u in replicas]  # each upstream's own POST count
    assert [sent[("r", url)] for url in urls] == counted
    assert sum(sent.values()) == LINES
    assert all(n > 0 for n in counted), counted  # spread over the replicas
    for name in ("in_flight", "errors_total", "spilled_total", "drained"):
        assert figures[f"backfill_replica_{name}"] == {("r", url): 0.0 for url in urls}, name
    assert set(figures["backfill_replica_external"]) == {("r", url) for url in urls}

    # the one-URL model: batch series, no replica series
    assert figures["backfill_batch_sent_total"][("solo", "")] == 5
    for name, series in figures.items():
        if name.startswith("backfill_replica_"):
            assert {model for model, _ in series} == {"r"}, (name, series)
