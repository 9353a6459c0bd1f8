"""The usage ledger on every store backend: an entry is recorded once by its `ref`, whoever
retries, and read back by time, project, batch and page."""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import TYPE_CHECKING

from backfill.domain.usage import BATCH, REALTIME, UsageEntry, realtime_ref, segment_ref
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
