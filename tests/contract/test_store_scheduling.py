"""Store contract for what several processes share: lease order across batches (deadline
first, fair shares between projects, at-risk first), revoking leases, duty claims and the
recording worker of a segment. Same tests on memory, SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from collections import Counter

from backfill.domain.records import BatchRecord, Project, Segment, Shard
from backfill.domain.statuses import BatchStatus
from backfill.store import Store

S = BatchStatus
NOW = 1_700_000_100.0


def batch(
    store: Store,
    project: Project,
    name: str,
    *,
    expires_at: int,
    shards: int = 4,
    created_at: int = 1_700_000_000,
) -> BatchRecord:
    record = BatchRecord(
        id=f"batch_{name}",
        project_id=project.id,
        endpoint="/v1/chat/completions",
        input_file_id="file-x",
        completion_window="24h",
        status=S.VALIDATING,
        created_at=created_at,
        expires_at=expires_at,
    )
    store.insert_batch(record)
    plan = [Shard(record.id, i, 1 + 10 * i, 100 * i, 100 * (i + 1), 10) for i in range(shards)]
    started = store.start_batch(record.id, plan, model="m", total=10 * shards, now=created_at)
    assert started is not None
    return started


def lease_batches(store: Store, n: int, **kw: object) -> list[str]:
    out = []
    for i in range(n):
        shard = store.lease_shard(f"w{i}", f"t{i}", NOW, 30.0, **kw)  # type: ignore[arg-type]
        assert shard is not None
        out.append(shard.batch_id)
    return out


def test_earliest_deadline_first_within_a_project(store: Store) -> None:
    p = store.ensure_project("p")
    batch(store, p, "late", expires_at=1_700_090_000, shards=2)
    batch(store, p, "soon", expires_at=1_700_010_000, shards=2)
    assert lease_batches(store, 4) == ["batch_soon"] * 2 + ["batch_late"] * 2


def test_fair_share_between_projects(store: Store) -> None:
    a, b = store.ensure_project("a"), store.ensure_project("b")
    # Project a has the earlier deadlines and more batches, yet b gets half the leases.
    batch(store, a, "a1", expires_at=1_700_010_000, shards=6)
    batch(store, a, "a2", expires_at=1_700_010_001, shards=6)
    batch(store, b, "b1", expires_at=1_700_090_000, shards=6)
    leased = lease_batches(store, 6)
    by_project = Counter("b" if x == "batch_b1" else "a" for x in leased)
    assert by_project == {"a": 3, "b": 3}


def test_weights_give_a_larger_share(store: Store) -> None:
    a, b = store.ensure_project("a"), store.ensure_project("b")
    batch(store, a, "a1", expires_at=1_700_010_000, shards=8)
    batch(store, b, "b1", expires_at=1_700_010_000, shards=8)
    leased = lease_batches(store, 8, weights={"a": 3.0, "b": 1.0})
    assert Counter(leased) == {"batch_a1": 6, "batch_b1": 2}


def test_at_risk_batch_goes_first(store: Store) -> None:
    a, b = store.ensure_project("a"), store.ensure_project("b")
    batch(store, a, "ontrack", expires_at=1_700_090_000, shards=4)
    risky = batch(store, b, "risky", expires_at=1_700_000_200, shards=4)
    first = store.lease_shard("w1", "tok1", NOW, 30.0)  # nobody at risk yet: EDF
    assert first is not None and first.batch_id == risky.id
    # One request done in 100 s: the other 39 need ~3900 s, far past the deadline.
    assert store.record_segment(Segment(risky.id, first.index, 0, "p", 1, 0), "tok1")
    # Project b now holds a lease and a holds none, so fair share alone would pick a;
    # the at-risk batch goes first anyway.
    nxt = store.lease_shard("w2", "tok2", NOW, 30.0)
    assert nxt is not None and nxt.batch_id == risky.id


def test_revoke_leases_fences_out_the_holder(store: Store) -> None:
    p = store.ensure_project("p")
    b = batch(store, p, "x", expires_at=1_700_090_000, shards=2)
    s1 = store.lease_shard("w", "tok", NOW, 30.0)
    assert s1 is not None
    assert store.revoke_leases(b.id) == 1
    assert not store.record_segment(Segment(b.id, s1.index, 0, "p", 1, 0), "tok")
    assert not store.renew_lease(b.id, s1.index, "tok", NOW, 30.0)
    assert store.get_batch(b.id).completed == 0  # type: ignore[union-attr]
    assert all(s.status == "pending" for s in store.shards(b.id))


def test_claims(store: Store) -> None:
    assert store.claim("finalize:b", "p1", 100.0, 10.0)
    assert not store.claim("finalize:b", "p2", 105.0, 10.0)
    assert store.claim("finalize:b", "p1", 105.0, 10.0)  # renew
    assert not store.claim("finalize:b", "p2", 114.0, 10.0)
    assert store.claim("finalize:b", "p2", 116.0, 10.0)  # expired: taken over
    store.release_claim("finalize:b", "p1")  # not the holder: nothing happens
    assert not store.claim("finalize:b", "p3", 117.0, 10.0)
    store.release_claim("finalize:b", "p2")
    assert store.claim("finalize:b", "p3", 117.0, 10.0)
    assert store.claim("other", "p1", 117.0, 10.0)


def test_claims_race_has_one_winner(backend: object, store: Store) -> None:
    opened = [backend.store() for _ in range(4)]  # type: ignore[attr-defined]
    wins: list[str] = []
    barrier = threading.Barrier(len(opened))

    def go(i: int, s: Store) -> None:
        barrier.wait()
        if s.claim("duty", f"owner{i}", 100.0, 30.0):
            wins.append(f"owner{i}")

    threads = [threading.Thread(target=go, args=(i, s)) for i, s in enumerate(opened)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1


def test_segment_owner_round_trips(store: Store) -> None:
    p = store.ensure_project("p")
    b = batch(store, p, "x", expires_at=1_700_090_000, shards=1)
    s1 = store.lease_shard("w", "tok", NOW, 30.0)
    assert s1 is not None
    assert store.record_segment(Segment(b.id, 0, 0, "p", 1, 0, owner="worker-7"), "tok")
    assert [s.owner for s in store.segments(b.id)] == ["worker-7"]
