"""The store contract: the same tests on memory, SQLite and PostgreSQL.

Time is always passed in (`now`), so expiry and leases are driven by numbers, not by sleeping.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import TYPE_CHECKING

import pytest

from backfill.domain.records import (
    BatchError,
    BatchRecord,
    FileRecord,
    Project,
    Segment,
    Shard,
    ShardStatus,
    Usage,
)
from backfill.domain.statuses import BatchStatus
from backfill.errors import Conflict, StoreError
from backfill.store import Store, open_store
from backfill.store.engine import normalize_url
from backfill.store.memory import MemoryStore
from backfill.store.sql import SqlStore

if TYPE_CHECKING:
    from conftest import Backend

S = BatchStatus


# -- helpers ---------------------------------------------------------------------------------
def make_file(
    store: Store,
    project: Project,
    n: int,
    *,
    purpose: str = "batch",
    expires_at: int | None = None,
) -> FileRecord:
    record = FileRecord(
        id=f"file-{project.name}-{n}",
        project_id=project.id,
        filename=f"input-{n}.jsonl",
        purpose=purpose,
        bytes=1000 + n,
        created_at=1_700_000_000 + n,
        blob_path=f"files/{project.name}/{n}",
        expires_at=expires_at,
    )
    store.insert_file(record)
    return record


def make_batch(
    store: Store,
    project: Project,
    n: int,
    *,
    input_file_id: str = "file-x",
    **kwargs: object,
) -> BatchRecord:
    record = BatchRecord(
        id=f"batch_{project.name}_{n}",
        project_id=project.id,
        endpoint="/v1/chat/completions",
        input_file_id=input_file_id,
        completion_window="24h",
        status=S.VALIDATING,
        created_at=1_700_000_000 + n,
        expires_at=1_700_086_400 + n,
    )
    return store.insert_batch(record, **kwargs)  # type: ignore[arg-type]


def plan(batch_id: str, count: int) -> list[Shard]:
    return [
        Shard(batch_id, i, first_line=1 + 10 * i, start=100 * i, end=100 * (i + 1), count=10)
        for i in range(count)
    ]


def started(store: Store, project: Project, n: int, shards: int = 2) -> BatchRecord:
    batch = make_batch(store, project, n)
    shard_plan = plan(batch.id, shards)
    result = store.start_batch(batch.id, shard_plan, model="m", total=10 * shards, now=5)
    assert result is not None
    return result


def snapshot(store: Store, batch_id: str) -> tuple[object, ...]:
    return (store.get_batch(batch_id), store.shards(batch_id), store.segments(batch_id))


# -- lifecycle -------------------------------------------------------------------------------
def test_migrate_is_idempotent(store: Store) -> None:
    store.migrate()
    store.migrate()
    assert store.ensure_project("p").name == "p"


def test_open_store_picks_backend(tmp_path: object) -> None:
    assert isinstance(open_store("memory://"), MemoryStore)
    sql = open_store(f"sqlite:///{tmp_path}/x.db")
    assert isinstance(sql, SqlStore)
    sql.close()
    with pytest.raises(ValueError):
        open_store(None)
    in_memory = open_store("sqlite://")
    in_memory.migrate()
    assert in_memory.ensure_project("p") == in_memory.ensure_project("p")
    in_memory.close()


def test_postgres_urls_use_psycopg_3() -> None:
    assert normalize_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgresql+psycopg://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"


# -- projects and keys -----------------------------------------------------------------------
def test_ensure_project_is_idempotent(store: Store) -> None:
    a = store.ensure_project("alpha")
    assert store.ensure_project("alpha") == a
    b = store.ensure_project("beta")
    assert b.id != a.id and b.name == "beta"


def test_api_keys(store: Store) -> None:
    a = store.ensure_project("alpha")
    b = store.ensure_project("beta")
    store.add_api_key(a.id, "hash-a", now=1)
    store.add_api_key(a.id, "hash-a", now=2)  # idempotent
    store.add_api_key(b.id, "hash-b", now=1)
    assert store.project_for_key("hash-a") == a
    assert store.project_for_key("hash-b") == b
    assert store.project_for_key("nope") is None
    with pytest.raises(Conflict):
        store.add_api_key(b.id, "hash-a", now=3)
    assert store.project_for_key("hash-a") == a


# -- files -----------------------------------------------------------------------------------
def test_file_roundtrip(store: Store) -> None:
    p = store.ensure_project("p")
    other = store.ensure_project("other")
    f = make_file(store, p, 1, expires_at=123)
    assert store.get_file(f.id) == f
    assert store.get_file(f.id, p.id) == f
    assert store.get_file(f.id, other.id) is None
    assert store.get_file("file-unknown") is None


def test_duplicate_file_id_is_a_store_error(store: Store) -> None:
    p = store.ensure_project("p")
    f = make_file(store, p, 1)
    with pytest.raises(StoreError):
        store.insert_file(f)


def test_list_files_order_and_purpose(store: Store) -> None:
    p = store.ensure_project("p")
    other = store.ensure_project("other")
    made = [make_file(store, p, n, purpose="batch" if n % 2 else "batch_output") for n in range(5)]
    make_file(store, other, 99)
    page = store.list_files(p.id)
    assert [f.id for f in page.items] == [f.id for f in reversed(made)]
    assert not page.has_more
    assert store.list_files(p.id, order="asc").items == made
    assert store.list_files(p.id, purpose="batch", order="asc").items == [made[1], made[3]]
    assert store.list_files(p.id, purpose="nothing").items == []


@pytest.mark.parametrize("order", ["asc", "desc"])
def test_list_files_pagination(store: Store, order: str) -> None:
    p = store.ensure_project("p")
    made = [make_file(store, p, n) for n in range(5)]
    expected = made if order == "asc" else list(reversed(made))
    first = store.list_files(p.id, order=order, limit=2)
    assert first.items == expected[:2] and first.has_more
    second = store.list_files(p.id, order=order, after=first.items[-1].id, limit=2)
    assert second.items == expected[2:4] and second.has_more
    third = store.list_files(p.id, order=order, after=second.items[-1].id, limit=2)
    assert third.items == expected[4:] and not third.has_more
    exact = store.list_files(p.id, order=order, after=expected[0].id, limit=4)
    assert exact.items == expected[1:] and not exact.has_more
    assert store.list_files(p.id, order=order, after="file-unknown").items == []


def test_list_files_after_another_projects_file_is_empty(store: Store) -> None:
    p = store.ensure_project("p")
    other = store.ensure_project("other")
    make_file(store, p, 1)
    foreign = make_file(store, other, 2)
    page = store.list_files(p.id, after=foreign.id)
    assert page.items == [] and not page.has_more


def test_delete_file(store: Store) -> None:
    p = store.ensure_project("p")
    other = store.ensure_project("other")
    f = make_file(store, p, 1)
    assert store.delete_file(f.id, other.id) is None
    assert store.get_file(f.id) == f
    assert store.delete_file(f.id, p.id) == f
    assert store.get_file(f.id) is None
    assert store.delete_file(f.id) is None
    g = make_file(store, p, 2)
    assert store.delete_file(g.id) == g
    assert store.list_files(p.id).items == []


def test_expired_files(store: Store) -> None:
    p = store.ensure_project("p")
    late = make_file(store, p, 1, expires_at=200)
    early = make_file(store, p, 2, expires_at=100)
    make_file(store, p, 3, expires_at=None)
    assert store.expired_files(99, 10) == []
    assert store.expired_files(150, 10) == [early]
    assert store.expired_files(200, 10) == [early, late]
    assert store.expired_files(10_000, 1) == [early]


def test_file_in_use(store: Store) -> None:
    p = store.ensure_project("p")
    f = make_file(store, p, 1)
    assert not store.file_in_use(f.id)
    batch = make_batch(store, p, 1, input_file_id=f.id)
    assert store.file_in_use(f.id)
    assert not store.file_in_use("file-other")
    assert store.transition(batch.id, [S.VALIDATING], S.FAILED, failed_at=9) is not None
    assert not store.file_in_use(f.id)


# -- batches ---------------------------------------------------------------------------------
def test_batch_roundtrip(store: Store) -> None:
    p = store.ensure_project("p")
    record = BatchRecord(
        id="batch_full",
        project_id=p.id,
        endpoint="/v1/embeddings",
        input_file_id="file-in",
        completion_window="24h",
        status=S.IN_PROGRESS,
        created_at=10,
        expires_at=86_410,
        model="minilm",
        output_file_id="file-out",
        error_file_id="file-err",
        in_progress_at=11,
        finalizing_at=12,
        completed_at=13,
        failed_at=14,
        expired_at=15,
        cancelling_at=16,
        cancelled_at=17,
        total=100,
        completed=60,
        failed=3,
        usage=Usage(10_000_000_000, 2, 3, 4),
        metadata={"team": "search", "run": "7"},
        errors=(BatchError("invalid_json_line", "bad", None, 3),),
        output_expires_after=3600,
        stop_reason=None,
    )
    assert store.insert_batch(record) == record
    got = store.get_batch(record.id)
    assert got == record
    assert isinstance(got.status, BatchStatus)
    assert got.metadata is not None
    got.metadata["team"] = "changed"
    assert store.get_batch(record.id) == record


def test_get_batch_respects_project(store: Store) -> None:
    p = store.ensure_project("p")
    other = store.ensure_project("other")
    b = make_batch(store, p, 1)
    assert store.get_batch(b.id, p.id) == b
    assert store.get_batch(b.id, other.id) is None
    assert store.get_batch("batch_unknown") is None


def test_duplicate_batch_id_is_a_store_error(store: Store) -> None:
    p = store.ensure_project("p")
    b = make_batch(store, p, 1)
    with pytest.raises(StoreError):
        store.insert_batch(b)


def test_list_batches_newest_first_paginated(store: Store) -> None:
    p = store.ensure_project("p")
    other = store.ensure_project("other")
    made = [make_batch(store, p, n) for n in range(5)]
    foreign = make_batch(store, other, 9)
    newest_first = list(reversed(made))
    page = store.list_batches(p.id, limit=2)
    assert page.items == newest_first[:2] and page.has_more
    page = store.list_batches(p.id, after=page.items[-1].id, limit=2)
    assert page.items == newest_first[2:4] and page.has_more
    page = store.list_batches(p.id, after=page.items[-1].id, limit=2)
    assert page.items == newest_first[4:] and not page.has_more
    everything = store.list_batches(p.id)
    assert everything.items == newest_first and not everything.has_more
    assert store.list_batches(p.id, after="batch_unknown").items == []
    assert store.list_batches(p.id, after=foreign.id).items == []


def test_batches_in_oldest_first(store: Store) -> None:
    p = store.ensure_project("p")
    a, b, c = (make_batch(store, p, n) for n in range(3))
    assert store.transition(b.id, [S.VALIDATING], S.CANCELLING, cancelling_at=1)
    assert [x.id for x in store.batches_in([S.VALIDATING])] == [a.id, c.id]
    assert [x.id for x in store.batches_in([S.VALIDATING, S.CANCELLING])] == [a.id, b.id, c.id]
    assert [x.id for x in store.batches_in([S.VALIDATING], limit=1)] == [a.id]
    assert store.batches_in([S.COMPLETED]) == []
    assert store.batches_in([]) == []


def test_idempotency_key_returns_the_same_batch(store: Store) -> None:
    p = store.ensure_project("p")
    first = make_batch(store, p, 1, idempotency_key="k1", request_hash="h1")
    again = make_batch(store, p, 2, idempotency_key="k1", request_hash="h1")
    assert again == first
    assert store.get_batch(f"batch_{p.name}_2") is None
    assert store.list_batches(p.id).items == [first]


def test_idempotency_key_with_another_request_conflicts(store: Store) -> None:
    p = store.ensure_project("p")
    make_batch(store, p, 1, idempotency_key="k1", request_hash="h1")
    with pytest.raises(Conflict, match="Idempotency-Key"):
        make_batch(store, p, 2, idempotency_key="k1", request_hash="h2")
    assert len(store.list_batches(p.id).items) == 1


def test_idempotency_key_is_per_project(store: Store) -> None:
    p = store.ensure_project("p")
    q = store.ensure_project("q")
    a = make_batch(store, p, 1, idempotency_key="k1", request_hash="h1")
    b = make_batch(store, q, 1, idempotency_key="k1", request_hash="h1")
    assert a.id != b.id
    # Without a key, every insert is a new batch.
    make_batch(store, p, 2)
    make_batch(store, p, 3)
    assert len(store.list_batches(p.id).items) == 3


def test_transition(store: Store) -> None:
    p = store.ensure_project("p")
    b = make_batch(store, p, 1)
    moved = store.transition(
        b.id,
        [S.VALIDATING],
        S.FAILED,
        failed_at=50,
        errors=[BatchError("empty_file", "no requests", line=None)],
    )
    assert moved is not None
    assert moved.status is S.FAILED and moved.failed_at == 50
    assert moved.errors == (BatchError("empty_file", "no requests"),)
    assert store.get_batch(b.id) == moved


def test_transition_refused_changes_nothing(store: Store) -> None:
    p = store.ensure_project("p")
    b = make_batch(store, p, 1)
    assert store.transition(b.id, [S.IN_PROGRESS, S.FINALIZING], S.CANCELLING) is None
    assert store.transition(b.id, [S.IN_PROGRESS], S.EXPIRED, expired_at=1) is None
    assert store.get_batch(b.id) == b
    assert store.transition("batch_unknown", [S.VALIDATING], S.FAILED) is None


def test_transition_accepts_error_dicts_and_usage(store: Store) -> None:
    p = store.ensure_project("p")
    b = make_batch(store, p, 1)
    moved = store.transition(
        b.id,
        [S.VALIDATING],
        S.IN_PROGRESS,
        errors=[{"code": "c", "message": "m", "param": "body", "line": 4}],
        usage=Usage(1, 2, 3, 4),
        metadata={"a": "b"},
    )
    assert moved is not None
    assert moved.errors == (BatchError("c", "m", "body", 4),)
    assert moved.usage == Usage(1, 2, 3, 4) and moved.metadata == {"a": "b"}


def test_transition_rejects_unknown_fields(store: Store) -> None:
    p = store.ensure_project("p")
    b = make_batch(store, p, 1)
    with pytest.raises(TypeError):
        store.transition(b.id, [S.VALIDATING], S.FAILED, no_such_field=1)
    with pytest.raises(TypeError):
        store.update_batch(b.id, [S.VALIDATING], status=S.FAILED)
    assert store.get_batch(b.id) == b


def test_update_batch(store: Store) -> None:
    p = store.ensure_project("p")
    b = make_batch(store, p, 1)
    assert store.update_batch(b.id, [S.IN_PROGRESS], output_file_id="file-o") is None
    updated = store.update_batch(b.id, [S.VALIDATING], output_file_id="file-o", stop_reason="x")
    assert updated is not None
    assert updated.status is S.VALIDATING
    assert updated.output_file_id == "file-o" and updated.stop_reason == "x"
    assert store.get_batch(b.id) == updated
    assert store.update_batch(b.id, [S.VALIDATING]) == updated
    assert store.update_batch(b.id, [S.FAILED]) is None
    cleared = store.update_batch(b.id, [S.VALIDATING], stop_reason=None)
    assert cleared is not None and cleared.stop_reason is None


def test_start_batch(store: Store) -> None:
    p = store.ensure_project("p")
    b = make_batch(store, p, 1)
    shards = plan(b.id, 3)
    result = store.start_batch(b.id, shards, model="llama", total=30, now=77)
    assert result is not None
    assert result.status is S.IN_PROGRESS
    assert (result.model, result.total, result.in_progress_at) == ("llama", 30, 77)
    assert store.get_batch(b.id) == result
    assert store.shards(b.id) == shards
    assert all(s.status == ShardStatus.PENDING and s.done == 0 for s in store.shards(b.id))
    assert store.start_batch(b.id, plan(b.id, 5), model="x", total=50, now=78) is None
    assert store.shards(b.id) == shards
    assert store.get_batch(b.id) == result


def test_start_batch_refused_when_not_validating(store: Store) -> None:
    p = store.ensure_project("p")
    b = make_batch(store, p, 1)
    assert store.transition(b.id, [S.VALIDATING], S.CANCELLING, cancelling_at=3)
    assert store.start_batch(b.id, plan(b.id, 2), model="m", total=20, now=4) is None
    assert store.shards(b.id) == []
    assert store.get_batch(b.id).status is S.CANCELLING  # type: ignore[union-attr]
    assert store.start_batch("batch_unknown", [], model=None, total=0, now=4) is None


# -- leases ----------------------------------------------------------------------------------
def test_lease_takes_the_oldest_shard_first(store: Store) -> None:
    p = store.ensure_project("p")
    a = started(store, p, 1, shards=2)
    b = started(store, p, 2, shards=1)
    got = [store.lease_shard("w", f"t{i}", now=100, lease_seconds=30) for i in range(4)]
    assert [(s.batch_id, s.index) for s in got if s] == [(a.id, 0), (a.id, 1), (b.id, 0)]
    assert got[3] is None
    first = got[0]
    assert first is not None
    assert first.status == ShardStatus.LEASED
    assert (first.lease_owner, first.lease_token, first.lease_expires_at) == ("w", "t0", 130)
    assert (first.first_line, first.start, first.end, first.count) == (1, 0, 100, 10)
    assert store.shards(a.id)[0] == first


def test_live_lease_is_not_taken_twice(store: Store) -> None:
    p = store.ensure_project("p")
    b = started(store, p, 1, shards=1)
    assert store.lease_shard("w1", "t1", now=100, lease_seconds=10) is not None
    assert store.lease_shard("w2", "t2", now=105, lease_seconds=10) is None
    # The lease runs until its expiry instant inclusive.
    assert store.lease_shard("w2", "t2", now=110, lease_seconds=10) is None
    assert store.shards(b.id)[0].lease_token == "t1"


def test_expired_lease_is_taken_over_and_the_old_token_is_fenced(store: Store) -> None:
    p = store.ensure_project("p")
    b = started(store, p, 1, shards=1)
    old = store.lease_shard("w1", "old", now=100, lease_seconds=10)
    assert old is not None
    assert store.record_segment(Segment(b.id, 0, 0, "seg/0", 2, 1, Usage(5, 0, 7, 0)), "old")
    new = store.lease_shard("w2", "new", now=111, lease_seconds=10)
    assert new is not None
    assert (new.batch_id, new.index, new.lease_token, new.lease_owner) == (b.id, 0, "new", "w2")
    assert new.done == 3  # progress survives the takeover
    before = snapshot(store, b.id)
    assert not store.record_segment(Segment(b.id, 0, 1, "seg/1", 5, 0, Usage(9, 9, 9, 9)), "old")
    assert not store.renew_lease(b.id, 0, "old", now=112, lease_seconds=100)
    assert not store.finish_shard(b.id, 0, "old")
    assert not store.release_shard(b.id, 0, "old")
    assert snapshot(store, b.id) == before
    assert store.record_segment(Segment(b.id, 0, 1, "seg/1", 5, 0, Usage(1, 0, 1, 0)), "new")
    batch = store.get_batch(b.id)
    assert batch is not None and (batch.completed, batch.failed) == (7, 1)


def test_renew_lease(store: Store) -> None:
    p = store.ensure_project("p")
    b = started(store, p, 1, shards=1)
    assert store.lease_shard("w1", "t1", now=100, lease_seconds=10)
    assert store.renew_lease(b.id, 0, "t1", now=108, lease_seconds=10)
    assert store.shards(b.id)[0].lease_expires_at == 118
    assert store.lease_shard("w2", "t2", now=115, lease_seconds=10) is None
    assert not store.renew_lease(b.id, 0, "wrong", now=108, lease_seconds=10)
    assert not store.renew_lease(b.id, 1, "t1", now=108, lease_seconds=10)
    assert store.lease_shard("w2", "t2", now=119, lease_seconds=10) is not None


def test_finish_shard(store: Store) -> None:
    p = store.ensure_project("p")
    b = started(store, p, 1, shards=1)
    assert store.lease_shard("w1", "t1", now=100, lease_seconds=10)
    assert store.finish_shard(b.id, 0, "t1")
    shard = store.shards(b.id)[0]
    assert shard.status == ShardStatus.DONE
    assert (shard.lease_owner, shard.lease_token, shard.lease_expires_at) == (None, None, None)
    assert store.lease_shard("w2", "t2", now=1000, lease_seconds=10) is None
    assert not store.finish_shard(b.id, 0, "t1")
    assert not store.record_segment(Segment(b.id, 0, 0, "s", 1, 0), "t1")


def test_release_shard(store: Store) -> None:
    p = store.ensure_project("p")
    b = started(store, p, 1, shards=2)
    assert store.lease_shard("w1", "t1", now=100, lease_seconds=10)
    assert store.record_segment(Segment(b.id, 0, 0, "s", 4, 0), "t1")
    assert store.release_shard(b.id, 0, "t1")
    shard = store.shards(b.id)[0]
    assert shard.status == ShardStatus.PENDING and shard.lease_token is None and shard.done == 4
    assert not store.release_shard(b.id, 0, "t1")
    again = store.lease_shard("w2", "t2", now=101, lease_seconds=10)
    assert again is not None and (again.index, again.lease_token, again.done) == (0, "t2", 4)


def test_stopped_batches_give_no_lease(store: Store) -> None:
    p = store.ensure_project("p")
    expiring = started(store, p, 1, shards=1)
    cancelling = started(store, p, 2, shards=1)
    make_batch(store, p, 3)  # still validating: no shards yet
    assert store.update_batch(expiring.id, [S.IN_PROGRESS], stop_reason="expired")
    assert store.transition(cancelling.id, [S.IN_PROGRESS], S.CANCELLING, cancelling_at=9)
    assert store.lease_shard("w", "t", now=100, lease_seconds=10) is None
    assert store.update_batch(expiring.id, [S.IN_PROGRESS], stop_reason=None)
    leased = store.lease_shard("w", "t", now=100, lease_seconds=10)
    assert leased is not None and leased.batch_id == expiring.id


def test_record_segment_adds_counts_and_usage(store: Store) -> None:
    p = store.ensure_project("p")
    b = started(store, p, 1, shards=2)
    s0 = store.lease_shard("w", "t0", now=100, lease_seconds=10)
    s1 = store.lease_shard("w", "t1", now=100, lease_seconds=10)
    assert s0 is not None and s1 is not None
    recorded = [
        (Segment(b.id, 1, 0, "b/1/0", 3, 1, Usage(100, 10, 50, 5)), "t1"),
        (Segment(b.id, 0, 1, "b/0/1", 2, 0, Usage(20, 0, 10, 0)), "t0"),
        (Segment(b.id, 0, 0, "b/0/0", 4, 2, Usage(40, 4, 20, 2)), "t0"),
    ]
    for segment, token in recorded:
        assert store.record_segment(segment, token)
    batch = store.get_batch(b.id)
    assert batch is not None
    assert (batch.completed, batch.failed) == (9, 3)
    expected = Usage(160, 14, 80, 7)
    assert batch.usage == expected
    assert store.usage_of(b.id) == expected
    assert [s.done for s in store.shards(b.id)] == [8, 4]
    by_key = [r[0] for r in recorded]
    assert store.segments(b.id) == [by_key[2], by_key[1], by_key[0]]
    assert store.segments(b.id, 0) == [by_key[2], by_key[1]]
    assert store.segments(b.id, 1) == [by_key[0]]
    assert store.segments("batch_unknown") == []
    assert store.usage_of("batch_unknown") == Usage()


def test_duplicate_segment_is_an_error_and_writes_nothing(store: Store) -> None:
    p = store.ensure_project("p")
    b = started(store, p, 1, shards=1)
    assert store.lease_shard("w", "t", now=100, lease_seconds=10)
    assert store.record_segment(Segment(b.id, 0, 0, "a", 1, 0, Usage(1, 0, 0, 0)), "t")
    before = snapshot(store, b.id)
    with pytest.raises(StoreError):
        store.record_segment(Segment(b.id, 0, 0, "b", 5, 5, Usage(9, 0, 0, 0)), "t")
    assert snapshot(store, b.id) == before


# -- concurrency -----------------------------------------------------------------------------
def test_concurrent_workers_lease_each_shard_exactly_once(backend: Backend) -> None:
    """Several workers, each with its own store (own engine and pool, like separate
    processes), lease, record and finish until nothing is left."""
    setup = backend.store()
    p = setup.ensure_project("p")
    batches = [started(setup, p, n, shards=15) for n in range(3)]
    workers = 6
    stores = [backend.store() for _ in range(workers)]
    barrier = threading.Barrier(workers)
    leased: list[list[tuple[str, int]]] = [[] for _ in range(workers)]
    failures: list[BaseException] = []

    def work(i: int) -> None:
        try:
            store = stores[i]
            barrier.wait(timeout=30)
            while True:
                token = f"w{i}-{len(leased[i])}"
                shard = store.lease_shard(f"w{i}", token, now=100, lease_seconds=600)
                if shard is None:
                    return
                leased[i].append((shard.batch_id, shard.index))
                segment = Segment(shard.batch_id, shard.index, 0, token, 9, 1, Usage(1, 0, 2, 0))
                assert store.record_segment(segment, token)
                assert store.finish_shard(shard.batch_id, shard.index, token)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert failures == []
    counts = Counter(key for per_worker in leased for key in per_worker)
    assert set(counts) == {(b.id, i) for b in batches for i in range(15)}
    assert max(counts.values()) == 1
    for b in batches:
        final = setup.get_batch(b.id)
        assert final is not None
        assert (final.completed, final.failed) == (135, 15)
        assert final.usage == Usage(15, 0, 30, 0) == setup.usage_of(b.id)
        assert all(s.status == ShardStatus.DONE and s.done == 10 for s in setup.shards(b.id))
