"""`Store.usage_totals` on every backend: the ledger summed per time bucket and group by the
store (SQL GROUP BY), with filters; the figures are worked out by hand below."""

from __future__ import annotations

import pytest

from backfill.domain.usage import BATCH, REALTIME, UsageEntry
from backfill.domain.usage_reports import UsageTotal
from backfill.store import Store

T0 = 1_700_000_000 - 1_700_000_000 % 86400  # a UTC midnight
H = 3600


def entry(ref: str, at: int, **kw: object) -> UsageEntry:
    values: dict[str, object] = {
        "ref": ref,
        "kind": BATCH,
        "project_id": "p1",
        "model": "m",
        "endpoint": "/v1/chat/completions",
        "at": at,
        "requests": 1,
        "currency": "usd",
    }
    return UsageEntry(**{**values, **kw})  # type: ignore[arg-type]


#: three entries over two hours and two projects (+ one outside the range, one embeddings)
ENTRIES = [
    entry("a", T0 + 10, requests=2, input_tokens=100, cached_tokens=40, output_tokens=30,
          engine_ms=1000, cost_micros=500, list_micros=1000, api_key_id="key_1"),
    entry("b", T0 + H - 1, project_id="p2", kind=REALTIME, model="n", input_tokens=5,
          output_tokens=7, engine_ms=20, cost_micros=12, list_micros=12, api_key_id="key_2"),
    entry("c", T0 + H, requests=3, input_tokens=50, cached_tokens=0, output_tokens=10,
          engine_ms=300, cost_micros=100, list_micros=200, api_key_id="key_1"),
    entry("late", T0 + 2 * H),  # at the end: excluded (end is exclusive)
    entry("emb", T0 + 20, endpoint="/v1/embeddings", model="e", input_tokens=9,
          currency=None),
]  # fmt: skip
CHAT = ["/v1/chat/completions"]


@pytest.fixture
def ledger(store: Store) -> Store:
    for e in ENTRIES:
        assert store.record_usage(e)
    return store


def test_hour_buckets_summed_over_projects(ledger: Store) -> None:
    got = ledger.usage_totals(start=T0, end=T0 + 2 * H, width=H, endpoints=CHAT)
    # hour 0: a + b = 3 requests, 105 in, 40 cached, 37 out; hour 1: c
    assert got == [
        UsageTotal(T0, requests=3, input_tokens=105, cached_tokens=40, output_tokens=37,
                   engine_ms=1020, cost_micros=512, list_micros=1012),
        UsageTotal(T0 + H, requests=3, input_tokens=50, output_tokens=10, engine_ms=300,
                   cost_micros=100, list_micros=200),
    ]  # fmt: skip


def test_grouped_by_project_and_batch(ledger: Store) -> None:
    got = ledger.usage_totals(
        start=T0, end=T0 + 2 * H, width=H, endpoints=CHAT, group_by=("project_id", "batch")
    )
    assert [(t.bucket - T0, t.project_id, t.batch, t.requests, t.input_tokens) for t in got] == [
        (0, "p1", True, 2, 100),
        (0, "p2", False, 1, 5),
        (H, "p1", True, 3, 50),
    ]
    assert all(t.model is None and t.api_key_id is None for t in got)


def test_one_day_bucket_and_filters(ledger: Store) -> None:
    day = dict(start=T0, end=T0 + 86400, width=86400)
    [total] = ledger.usage_totals(**day, endpoints=CHAT)  # type: ignore[arg-type]
    # a + b + c + late
    assert (total.bucket, total.requests, total.input_tokens, total.output_tokens) == (
        T0, 7, 155, 47,
    )  # fmt: skip
    [p2] = ledger.usage_totals(**day, project_ids=["p2"])  # type: ignore[arg-type]
    assert (p2.requests, p2.input_tokens) == (1, 5)
    assert ledger.usage_totals(**day, project_ids=[]) == []  # type: ignore[arg-type]
    [k1] = ledger.usage_totals(**day, api_key_ids=["key_1"], group_by=("api_key_id",))  # type: ignore[arg-type]
    assert (k1.api_key_id, k1.requests, k1.cost_micros) == ("key_1", 5, 600)
    [rt] = ledger.usage_totals(**day, batch=False)  # type: ignore[arg-type]
    assert rt.requests == 1 and rt.output_tokens == 7
    [emb] = ledger.usage_totals(**day, endpoints=["/v1/embeddings"], group_by=("currency",))  # type: ignore[arg-type]
    assert (emb.input_tokens, emb.currency) == (9, None)
    by_model = ledger.usage_totals(**day, models=["m", "n"], group_by=("model",))  # type: ignore[arg-type]
    assert [(t.model, t.requests) for t in by_model] == [("m", 6), ("n", 1)]


def test_buckets_count_from_start_not_from_midnight(ledger: Store) -> None:
    # start 30 min before T0: hour buckets [T0-30m, T0+30m) holds a and emb, the next holds b
    start = T0 - H // 2
    got = ledger.usage_totals(start=start, end=start + 2 * H, width=H, group_by=("model",))
    assert [(t.bucket - start, t.model, t.requests) for t in got] == [
        (0, "e", 1),
        (0, "m", 2),
        (H, "m", 3),
        (H, "n", 1),
    ]


def test_unknown_group_is_refused(store: Store) -> None:
    with pytest.raises(ValueError):
        store.usage_totals(start=0, end=1, width=60, group_by=("user_id",))
