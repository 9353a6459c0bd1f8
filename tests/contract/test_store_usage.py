"""The usage ledger on every store backend: an entry is recorded once by its `ref`, whoever
retries, and read back by time, project, batch and page."""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import TYPE_CHECKING

import pytest
from test_store import make_batch, plan

from backfill.domain.records import BatchRecord, Cost, Segment, Usage
from backfill.domain.statuses import BatchStatus
from backfill.domain.usage import BATCH, REALTIME, UsageEntry, realtime_ref, segment_ref
from backfill.errors import StoreError
from backfill.store import Store

if TYPE_CHECKING:
    from conftest import Backend


def entry(ref: str, at: int, project: str = "p1", **kw: object) -> UsageEntry:
    values: dict[str, object] = {
        "ref": ref,
        "kind": BATCH,
        "project_id": project,
        "model": "m",
        "endpoint": "/v1/chat/completions",
        "at": at,
        "requests": 2,
        "input_tokens": 10,
        "cached_tokens": 4,
        "output_tokens": 7,
        "engine_ms": 1500,
        "cost_micros": 125,
        "list_micros": 250,
        "currency": "USD",
    }
    return UsageEntry(**{**values, **kw})  # type: ignore[arg-type]


def test_an_entry_is_recorded_once(store: Store) -> None:
    first = entry(segment_ref("batch_1", 0, 1), 100, batch_id="batch_1", api_key_id="key_a")
    assert store.record_usage(first)
    assert not store.record_usage(first)
    assert not store.record_usage(entry(first.ref, 200, output_tokens=999))  # same ref
    [got] = store.usage_entries()
    assert got.seq > 0
    assert got == replace(first, seq=got.seq)
    assert (got.output_tokens, got.at, got.api_key_id, got.engine_ms, got.cost_micros) == (
        7, 100, "key_a", 1500, 125,
    )  # fmt: skip


def test_entries_by_time_project_batch_and_page(store: Store) -> None:
    for n in range(6):
        store.record_usage(
            entry(
                realtime_ref(f"r{n}") if n % 2 else segment_ref("batch_x", 0, n),
                100 + 10 * n,
                project="p1" if n < 4 else "p2",
                kind=REALTIME if n % 2 else BATCH,
                batch_id=None if n % 2 else "batch_x",
            )
        )
    assert [e.at for e in store.usage_entries(start=110, end=140)] == [110, 120, 130]
    assert [e.at for e in store.usage_entries(project_id="p2")] == [140, 150]
    assert [e.at for e in store.usage_entries(batch_id="batch_x")] == [100, 120, 140]
    page = store.usage_entries(limit=4)
    assert [e.at for e in store.usage_entries(after_seq=page[-1].seq)] == [140, 150]


def test_concurrent_writers_of_one_ref_record_it_once(backend: Backend) -> None:
    stores = [backend.store() for _ in range(4)]
    stores[0].ensure_project("p")
    barrier = threading.Barrier(len(stores))
    won: list[bool] = []

    def write(s: Store) -> None:
        barrier.wait(timeout=30)
        for n in range(20):
            won.append(s.record_usage(entry(f"seg:b:0:{n}", 100)))

    threads = [threading.Thread(target=write, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert won.count(True) == 20
    assert len(stores[0].usage_entries()) == 20


def test_a_key_lookup_names_the_key_and_whether_it_is_admin(store: Store) -> None:
    p = store.ensure_project("p")
    store.add_api_key(p.id, "hash-plain", 1, prefix="sk-a")
    store.add_api_key(p.id, "hash-admin", 1, prefix="sk-b", admin=True)
    ids = {k.prefix: k.id for k in store.list_api_keys("p")}
    plain, admin = store.project_for_key("hash-plain"), store.project_for_key("hash-admin")
    assert plain is not None and admin is not None
    assert (plain.key_id, plain.admin) == (ids["sk-a"], False)
    assert (admin.key_id, admin.admin) == (ids["sk-b"], True)
    assert plain == admin == p  # the same project


# -- a recorded segment writes its ledger entry --------------------------------------------------
def priced_batch(store: Store, n: int = 1, shards: int = 2) -> BatchRecord:
    p = store.ensure_project("p")
    b = make_batch(store, p, n)
    assert store.update_batch(b.id, [BatchStatus.VALIDATING], api_key_id="key_1")
    started = store.start_batch(b.id, plan(b.id, shards), model="m", total=10 * shards, now=5)
    assert started is not None
    return started


def test_a_batch_keeps_the_key_that_created_it(store: Store) -> None:
    p = store.ensure_project("p")
    b = make_batch(store, p, 1)
    assert b.api_key_id is None
    keyed = store.insert_batch(replace(b, id="batch_keyed", api_key_id="key_9"))
    got = store.get_batch(keyed.id)
    assert got is not None and got.api_key_id == "key_9" and got.cost is None


def test_a_recorded_segment_writes_one_ledger_entry_with_the_batch(store: Store) -> None:
    b = priced_batch(store)
    assert store.lease_shard("w", "t0", now=100, lease_seconds=10) is not None
    assert store.lease_shard("w", "t1", now=100, lease_seconds=10) is not None
    first = Segment(
        b.id, 0, 0, "s/0/0", 3, 1, Usage(100, 40, 30, 5), engine_ms=1200,
        cost=Cost("usd", 125, 250), at=1_700_000_100,
    )  # fmt: skip
    second = Segment(
        b.id, 1, 0, "s/1/0", 2, 0, Usage(10, 0, 7, 0), engine_ms=300,
        cost=Cost("usd", 5, 9), at=1_700_000_200,
    )  # fmt: skip
    assert store.record_segment(first, "t0")
    assert store.record_segment(second, "t1")
    entries = store.usage_entries(batch_id=b.id)
    assert [e.ref for e in entries] == [segment_ref(b.id, 0, 0), segment_ref(b.id, 1, 0)]
    e = entries[0]
    assert (e.kind, e.project_id, e.api_key_id, e.model, e.endpoint, e.batch_id) == (
        BATCH, b.project_id, "key_1", "m", "/v1/chat/completions", b.id,
    )  # fmt: skip
    assert (e.at, e.requests, e.engine_ms) == (1_700_000_100, 4, 1200)
    assert (e.input_tokens, e.cached_tokens, e.output_tokens, e.reasoning_tokens) == (
        100, 40, 30, 5,
    )  # fmt: skip
    assert (e.cost_micros, e.list_micros, e.currency) == (125, 250, "usd")
    batch = store.get_batch(b.id)
    assert batch is not None
    assert batch.cost == Cost("usd", 130, 259)
    assert batch.usage == Usage(110, 40, 37, 5)
    assert [s.engine_ms for s in store.segments(b.id)] == [1200, 300]


def test_a_retried_checkpoint_writes_no_second_entry(backend: Backend) -> None:
    """The first commit landed but its answer was lost: the worker records the same segment
    again (here from another connection, as after a reconnect): nothing is counted twice."""
    store, again = backend.store(), backend.store()
    b = priced_batch(store)
    assert store.lease_shard("w", "t0", now=100, lease_seconds=10) is not None
    segment = Segment(b.id, 0, 0, "s/0/0", 5, 0, Usage(50, 0, 20, 0), cost=Cost("usd", 7, 14))
    assert store.record_segment(segment, "t0")
    assert again.record_segment(segment, "t0")
    assert store.record_segment(segment, "t0")
    assert len(store.usage_entries(batch_id=b.id)) == 1
    batch = store.get_batch(b.id)
    assert batch is not None
    assert (batch.completed, batch.usage, batch.cost) == (
        5,
        Usage(50, 0, 20, 0),
        Cost("usd", 7, 14),
    )


def test_a_segment_refused_writes_no_entry(store: Store) -> None:
    b = priced_batch(store)
    assert store.lease_shard("w", "t0", now=100, lease_seconds=10) is not None
    # a lost lease (another token): fenced, nothing written
    assert not store.record_segment(Segment(b.id, 0, 0, "s", 1, 0, Usage(1, 0, 1, 0)), "old")
    assert store.usage_entries() == []
    assert store.record_segment(Segment(b.id, 0, 0, "s", 1, 0, Usage(1, 0, 1, 0)), "t0")
    # the same seq with another object: an error, and still one entry
    with pytest.raises(StoreError):
        store.record_segment(Segment(b.id, 0, 0, "other", 9, 0, Usage(9, 0, 9, 0)), "t0")
    assert [e.input_tokens for e in store.usage_entries()] == [1]


def test_an_unpriced_segment_records_zero_cost_and_no_currency(store: Store) -> None:
    b = priced_batch(store)
    assert store.lease_shard("w", "t0", now=100, lease_seconds=10) is not None
    assert store.record_segment(Segment(b.id, 0, 0, "s", 2, 0, Usage(8, 0, 4, 0)), "t0")
    [e] = store.usage_entries()
    assert (e.cost_micros, e.list_micros, e.currency, e.requests) == (0, 0, None, 2)
    batch = store.get_batch(b.id)
    assert batch is not None and batch.cost is None


def test_concurrent_workers_ledger_matches_the_batches(backend: Backend) -> None:
    """Workers on their own connections record segments of many shards at once (and each
    retries its checkpoint once): per batch, the ledger sums to the batch's counters."""
    setup = backend.store()
    batches = [priced_batch(setup, n, shards=6) for n in range(2)]
    stores = [backend.store() for _ in range(4)]
    barrier = threading.Barrier(len(stores))
    failures: list[BaseException] = []

    def work(i: int) -> None:
        try:
            s = stores[i]
            barrier.wait(timeout=30)
            n = 0
            while (shard := s.lease_shard(f"w{i}", f"w{i}-{n}", 100, 600)) is not None:
                token = f"w{i}-{n}"
                n += 1
                for seq in range(3):
                    seg = Segment(
                        shard.batch_id, shard.index, seq, f"{token}/{seq}", 2, 1,
                        Usage(10 + seq, seq, 5, 0), engine_ms=7, cost=Cost("usd", 3, 6),
                    )  # fmt: skip
                    assert s.record_segment(seg, token)
                    assert s.record_segment(seg, token)  # the retried checkpoint
                assert s.finish_shard(shard.batch_id, shard.index, token)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert failures == []
    for b in batches:
        entries = setup.usage_entries(batch_id=b.id)
        batch = setup.get_batch(b.id)
        assert batch is not None
        assert len(entries) == 6 * 3
        assert sum(e.requests for e in entries) == batch.completed + batch.failed == 54
        assert sum(e.input_tokens for e in entries) == batch.usage.input_tokens == 6 * 33
        assert sum(e.cost_micros for e in entries) == batch.cost.billed_micros == 54  # type: ignore[union-attr]
        assert sum(e.engine_ms for e in entries) == 6 * 21
