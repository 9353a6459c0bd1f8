"""The store contract of API keys (ids, sources, revocation) and of finished batches' debris,
on every backend; and the 0003 migration of a database that already holds keys."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import insert
from test_store import make_batch, started

from backfill.domain.records import Project, Segment
from backfill.domain.statuses import BatchStatus
from backfill.errors import Conflict
from backfill.store import Store
from backfill.store.schema import api_keys, projects
from backfill.store.sql import MIGRATIONS, SqlStore

S = BatchStatus


# -- keys ------------------------------------------------------------------------------------
def test_keys_have_ids_prefixes_and_sources(store: Store) -> None:
    a = store.ensure_project("alpha")
    b = store.ensure_project("beta")
    store.add_api_key(a.id, "hash-a", now=10, prefix="sk-bf-Ab")
    store.add_api_key(b.id, "hash-b", now=20, source="flag")
    store.add_api_key(a.id, "hash-a", now=30, prefix="other")  # idempotent: nothing changes
    keys = store.list_api_keys()
    assert [(k.project_id, k.project, k.prefix, k.source, k.created_at) for k in keys] == [
        (
            a.id,
            "alpha",
            "sk-bf-Ab",
            "cli",
            10,
        ),
        (b.id, "beta", None, "flag", 20),
    ]
    assert all(k.id.startswith("key_") and k.revoked_at is None for k in keys)
    assert len({k.id for k in keys}) == 2
    assert store.list_api_keys("beta") == [keys[1]]
    assert store.list_api_keys("nobody") == []
    with pytest.raises(Conflict):
        store.add_api_key(b.id, "hash-a", now=40, source="flag")


def test_a_revoked_key_finds_no_project(store: Store) -> None:
    a = store.ensure_project("alpha")
    store.add_api_key(a.id, "hash-a", now=10)
    store.add_api_key(a.id, "hash-b", now=11)
    key_a = store.list_api_keys()[0]
    revoked = store.revoke_api_key(key_a.id, now=50)
    assert revoked is not None
    assert (revoked.id, revoked.revoked_at, revoked.project) == (key_a.id, 50, "alpha")
    assert store.project_for_key("hash-a") is None
    assert store.project_for_key("hash-b") == a
    again = store.revoke_api_key(key_a.id, now=60)  # already revoked: keeps the first time
    assert again is not None and again.revoked_at == 50
    assert store.revoke_api_key("key_unknown", now=70) is None
    assert [k.revoked_at for k in store.list_api_keys()] == [50, None]
    store.add_api_key(a.id, "hash-a", now=80)  # a cli re-add does not bring it back
    assert store.project_for_key("hash-a") is None


def test_flag_keys_live_while_given(store: Store) -> None:
    default = store.ensure_project("default")
    store.add_api_key(default.id, "hash-cli", now=1)
    for n, key_hash in enumerate(("hash-f1", "hash-f2")):
        store.add_api_key(default.id, key_hash, now=2 + n, prefix="sk-", source="flag")
    # a start given only f1: f2 goes, the cli key stays
    gone = store.revoke_flag_keys({"hash-f1"}, now=100)
    assert [(k.source, k.revoked_at) for k in gone] == [("flag", 100)]
    assert store.project_for_key("hash-f2") is None
    assert store.project_for_key("hash-f1") == default
    assert store.project_for_key("hash-cli") == default
    assert store.revoke_flag_keys({"hash-f1"}, now=101) == []  # nothing more to revoke
    # a later start given f2 again: valid again
    store.add_api_key(default.id, "hash-f2", now=200, prefix="sk-", source="flag")
    assert store.project_for_key("hash-f2") == default
    # a start given nothing: every flag key goes
    assert len(store.revoke_flag_keys(set(), now=300)) == 2
    assert store.project_for_key("hash-f1") is None
    assert store.project_for_key("hash-cli") == default
    # a cli key given at start becomes a flag key (valid while given)
    store.add_api_key(default.id, "hash-cli", now=400, prefix="sk-", source="flag")
    assert store.revoke_flag_keys(set(), now=500)[0].source == "flag"
    assert store.project_for_key("hash-cli") is None


def test_migration_0003_keeps_existing_keys(empty_url: str) -> None:
    """A database made before key ids: its keys get ids, source `legacy`, and keep working."""
    store = SqlStore(empty_url)
    try:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with store.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0002")
            conn.execute(insert(projects).values(id="proj_1", name="default", created_at=5))
            for n in range(3):
                conn.execute(
                    insert(api_keys).values(key_hash=f"h{n}", project_id="proj_1", created_at=n)
                )
        store.migrate()
        keys = store.list_api_keys()
        assert [(k.source, k.prefix, k.project) for k in keys] == [("legacy", None, "default")] * 3
        assert len({k.id for k in keys}) == 3 and all(k.id.startswith("key_") for k in keys)
        assert store.project_for_key("h1") == Project("proj_1", "default")
        store.add_api_key("proj_1", "h2", now=9, prefix="sk-lo", source="flag")  # given again
        assert store.revoke_flag_keys({"h2"}, now=10) == []  # legacy keys are not flag keys
        assert [k.source for k in store.list_api_keys()] == ["legacy", "legacy", "flag"]
        store.add_api_key("proj_1", "h9", now=11)
        assert store.list_api_keys()[-1].source == "cli"
    finally:
        store.close()


# -- debris of finished batches ----------------------------------------------------------------
def finished(store: Store, project: Project, n: int, final: BatchStatus = S.COMPLETED) -> str:
    """A batch that ran (two shards, a segment each) and reached `final`; nothing cleaned."""
    batch = started(store, project, n, shards=2)
    for index in (0, 1):
        shard = store.lease_shard("w", f"t{n}-{index}", now=100, lease_seconds=30)
        assert shard is not None
        assert shard.batch_id == batch.id, "lease the finished batch's shards first"
        segment = Segment(batch.id, shard.index, 0, f"batches/{batch.id}/seg/{shard.index}", 10, 0)
        assert store.record_segment(segment, f"t{n}-{index}")
        assert store.finish_shard(batch.id, shard.index, f"t{n}-{index}")
    assert store.transition(batch.id, [S.IN_PROGRESS], S.FINALIZING, finalizing_at=200)
    assert store.transition(batch.id, [S.FINALIZING], final, **{f"{final.value}_at": 300})
    return batch.id


def test_terminal_batches_with_segments(store: Store) -> None:
    p = store.ensure_project("p")
    done = finished(store, p, 2)
    expired = finished(store, p, 3, S.EXPIRED)
    running = started(store, p, 1, shards=2)
    shard = store.lease_shard("w", "t", now=100, lease_seconds=30)
    assert shard is not None and shard.batch_id == running.id
    assert store.record_segment(Segment(running.id, shard.index, 0, "seg", 5, 0), "t")
    validating = make_batch(store, p, 4)
    failed = make_batch(store, p, 5)
    assert store.transition(failed.id, [S.VALIDATING], S.FAILED, failed_at=9)
    assert store.terminal_batches_with_segments(10) == [done, expired]
    assert store.terminal_batches_with_segments(1) == [done]
    assert validating.id not in store.terminal_batches_with_segments(10)


def test_delete_segments_only_of_terminal_batches(store: Store) -> None:
    p = store.ensure_project("p")
    done = finished(store, p, 2, S.CANCELLED)
    running = started(store, p, 1, shards=2)
    before = store.get_batch(done)
    assert store.delete_segments(running.id) == 0
    assert len(store.shards(running.id)) == 2
    assert store.delete_segments(done) == 4  # two segments, two shards
    assert store.shards(done) == [] and store.segments(done) == []
    assert store.delete_segments(done) == 0
    assert store.delete_segments("batch_unknown") == 0
    assert store.get_batch(done) == before  # the batch itself, counts and usage stay
    assert store.terminal_batches_with_segments(10) == []
