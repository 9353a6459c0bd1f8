"""Store contract for leasing by model room: a worker names the models it has no room for
(`skip_models`) and is given a shard of another model, or nothing. Same tests on memory,
SQLite and PostgreSQL."""

from __future__ import annotations

from backfill.domain.records import BatchRecord, Project, Shard
from backfill.domain.statuses import BatchStatus
from backfill.store import Store

NOW = 1_700_000_100.0


def batch(
    store: Store,
    project: Project,
    name: str,
    model: str | None,
    *,
    shards: int = 2,
    expires_at: int = 1_700_090_000,
) -> BatchRecord:
    record = BatchRecord(
        id=f"batch_{name}",
        project_id=project.id,
        endpoint="/v1/chat/completions",
        input_file_id="file-x",
        completion_window="24h",
        status=BatchStatus.VALIDATING,
        created_at=1_700_000_000,
        expires_at=expires_at,
    )
    store.insert_batch(record)
    plan = [Shard(record.id, i, 1 + 10 * i, 100 * i, 100 * (i + 1), 10) for i in range(shards)]
    started = store.start_batch(record.id, plan, model=model, total=10 * shards, now=1_700_000_000)
    assert started is not None
    return started


def test_skipped_models_are_left_for_others(store: Store) -> None:
    p = store.ensure_project("p")
    # the full model's batch has the earliest deadline: without the filter it goes first
    batch(store, p, "full", "big", expires_at=1_700_010_000)
    batch(store, p, "room", "small", expires_at=1_700_050_000)
    batch(store, p, "unserved", None, shards=1, expires_at=1_700_080_000)
    got = [store.lease_shard("w", f"t{i}", NOW, 30.0, skip_models={"big"}) for i in range(4)]
    assert [s.batch_id if s else None for s in got] == [
        "batch_room",
        "batch_room",
        "batch_unserved",  # a batch without a model is never skipped
        None,  # only the skipped model's shards are left
    ]
    # an empty filter is no filter; the skipped batch was untouched
    rest = [store.lease_shard("w", f"u{i}", NOW, 30.0, skip_models=()) for i in range(3)]
    assert [s.batch_id if s else None for s in rest] == ["batch_full", "batch_full", None]


def test_several_models_skipped(store: Store) -> None:
    p = store.ensure_project("p")
    batch(store, p, "a", "m-a", shards=1)
    batch(store, p, "b", "m-b", shards=1)
    batch(store, p, "c", "m-c", shards=1)
    shard = store.lease_shard("w", "t", NOW, 30.0, skip_models=["m-a", "m-c"])
    assert shard is not None and shard.batch_id == "batch_b"
    assert store.lease_shard("w", "t2", NOW, 30.0, skip_models=["m-a", "m-c"]) is None


def test_expired_lease_of_a_skipped_model_is_not_taken(store: Store) -> None:
    p = store.ensure_project("p")
    b = batch(store, p, "x", "big", shards=1)
    assert store.lease_shard("w1", "t1", NOW, 10.0) is not None
    later = NOW + 60  # the lease has run out
    assert store.lease_shard("w2", "t2", later, 10.0, skip_models={"big"}) is None
    again = store.lease_shard("w2", "t3", later, 10.0, skip_models={"other"})
    assert again is not None and again.batch_id == b.id and again.lease_token == "t3"


def test_skipped_models_still_count_in_fair_shares(store: Store) -> None:
    a, b = store.ensure_project("a"), store.ensure_project("b")
    batch(store, a, "a-big", "big", shards=2)
    first = store.lease_shard("w", "t0", NOW, 30.0)
    assert first is not None and first.batch_id == "batch_a-big"
    # a holds a live lease (of the model now skipped), b none: b's batch goes first even
    # though a's has the earlier deadline
    batch(store, a, "a-small", "small", shards=2, expires_at=1_700_010_000)
    batch(store, b, "b-small", "small", shards=2, expires_at=1_700_080_000)
    nxt = store.lease_shard("w", "t1", NOW, 30.0, skip_models={"big"})
    assert nxt is not None and nxt.batch_id == "batch_b-small"
