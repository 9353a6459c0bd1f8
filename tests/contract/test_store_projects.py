"""Project settings and quotas on every store backend: settings round-trip, the live figures,
the active-batch cap at insert and the enqueued-token limit at start, checked in the write's
own transaction, so concurrent starts from several "processes" cannot both pass."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import pytest
from test_store import make_batch, plan

from backfill.domain.projects import ProjectLoad, ProjectSettings
from backfill.domain.statuses import BatchStatus as S
from backfill.errors import QuotaExceeded
from backfill.store import Store

if TYPE_CHECKING:
    from conftest import Backend


def test_settings_round_trip(store: Store) -> None:
    alpha = store.ensure_project("alpha")
    store.ensure_project("beta")
    assert store.project_settings(alpha.id) == ProjectSettings()
    assert store.project_settings("proj_unknown") is None
    assert store.set_project_settings("nope", ProjectSettings(weight=2.0)) is None
    settings = ProjectSettings(
        token_limits={"m": 1000, "e": 5},
        max_active_batches=3,
        weight=2.5,
        realtime_rpm=60.0,
        realtime_tpm=None,
    )
    assert store.set_project_settings("alpha", settings) == alpha
    assert store.project_settings(alpha.id) == settings
    listed = store.projects()
    assert [(p.name, s) for p, s in listed] == [("alpha", settings), ("beta", ProjectSettings())]
    store.set_project_settings("alpha", ProjectSettings())  # cleared: the server's defaults
    assert store.project_settings(alpha.id) == ProjectSettings()


def test_load_counts_unfinished_batches_and_their_tokens(store: Store) -> None:
    p = store.ensure_project("alpha")
    other = store.ensure_project("beta")
    a = make_batch(store, p, 1)
    b = make_batch(store, p, 2)
    make_batch(store, p, 3)  # still validating: active, no tokens yet
    c = make_batch(store, other, 4)
    store.start_batch(a.id, plan(a.id, 1), model="m", total=10, now=5, enqueued_tokens=100)
    store.start_batch(b.id, plan(b.id, 1), model="e", total=10, now=5, enqueued_tokens=7)
    store.start_batch(c.id, plan(c.id, 1), model="m", total=10, now=5, enqueued_tokens=1000)
    assert store.project_load(p.id) == ProjectLoad(3, {"m": 100, "e": 7})
    store.transition(a.id, [S.IN_PROGRESS], S.FINALIZING, finalizing_at=6)
    assert store.project_load(p.id) == ProjectLoad(3, {"m": 100, "e": 7})  # not yet finished
    store.transition(a.id, [S.FINALIZING], S.COMPLETED, completed_at=7)
    store.transition(b.id, [S.IN_PROGRESS], S.CANCELLING, cancelling_at=7)
    assert store.project_load(p.id) == ProjectLoad(2, {"e": 7})
    assert store.project_load(other.id) == ProjectLoad(1, {"m": 1000})


def test_token_limit_at_start(store: Store) -> None:
    p = store.ensure_project("alpha")
    store.set_project_settings("alpha", ProjectSettings(token_limits={"m": 150}))
    a, b, c, d = (make_batch(store, p, n) for n in range(4))
    assert store.start_batch(a.id, plan(a.id, 1), model="m", total=1, now=5, enqueued_tokens=100)
    with pytest.raises(QuotaExceeded) as refused:
        store.start_batch(b.id, plan(b.id, 1), model="m", total=1, now=5, enqueued_tokens=51)
    assert refused.value.code == "token_limit_exceeded"
    assert refused.value.message == (
        "Enqueued token limit reached for m in project alpha. Limit: 150 enqueued tokens. "
        "Please try again once some in_progress batches have been completed."
    )
    refused_batch = store.get_batch(b.id)
    assert refused_batch is not None and refused_batch.status is S.VALIDATING  # nothing written
    assert store.shards(b.id) == []
    # exactly at the limit passes; another model has no limit
    assert store.start_batch(b.id, plan(b.id, 1), model="m", total=1, now=5, enqueued_tokens=50)
    assert store.start_batch(c.id, plan(c.id, 1), model="x", total=1, now=5, enqueued_tokens=10**9)
    with pytest.raises(QuotaExceeded):
        store.start_batch(d.id, plan(d.id, 1), model="m", total=1, now=5, enqueued_tokens=1)
    store.transition(a.id, [S.IN_PROGRESS], S.FINALIZING, finalizing_at=6)
    store.transition(a.id, [S.FINALIZING], S.COMPLETED, completed_at=6)  # tokens freed
    assert store.start_batch(d.id, plan(d.id, 1), model="m", total=1, now=5, enqueued_tokens=100)
    # without a count (an older caller) nothing is checked
    e = make_batch(store, p, 9)
    assert store.start_batch(e.id, plan(e.id, 1), model="m", total=1, now=5)


def test_active_batch_cap_at_insert(store: Store) -> None:
    p = store.ensure_project("alpha")
    store.set_project_settings("alpha", ProjectSettings(max_active_batches=2))
    first = make_batch(store, p, 1)
    make_batch(store, p, 2, idempotency_key="k", request_hash="h")
    with pytest.raises(QuotaExceeded) as refused:
        make_batch(store, p, 3)
    assert refused.value.code == "active_batch_limit_exceeded"
    assert refused.value.status_code == 429 and not refused.value.retryable
    assert store.get_batch("batch_alpha_3") is None
    # replaying an idempotent create returns the batch made then, cap or not
    assert make_batch(store, p, 2, idempotency_key="k", request_hash="h").id == "batch_alpha_2"
    store.transition(first.id, [S.VALIDATING], S.FAILED, failed_at=6)
    make_batch(store, p, 3)  # a slot freed
    # another project is not capped
    q = store.ensure_project("beta")
    for n in range(4):
        make_batch(store, q, 10 + n)


def test_concurrent_starts_cannot_both_pass_the_limit(backend: Backend) -> None:
    """Each of 4 "processes" starts one batch of 60 tokens under a limit of 100 at the same
    moment: exactly one may start, whatever the interleaving."""
    stores = [backend.store() for _ in range(4)]
    p = stores[0].ensure_project("alpha")
    stores[0].set_project_settings("alpha", ProjectSettings(token_limits={"m": 100}))
    batches = [make_batch(stores[0], p, n) for n in range(len(stores))]
    barrier = threading.Barrier(len(stores))
    outcomes: list[str] = []

    def start(i: int) -> None:
        barrier.wait(timeout=30)
        b = batches[i]
        try:
            stores[i].start_batch(
                b.id, plan(b.id, 1), model="m", total=1, now=5, enqueued_tokens=60
            )
            outcomes.append("started")
        except QuotaExceeded:
            outcomes.append("refused")
        except Exception as exc:  # anything else is the test's failure, not a lost thread
            outcomes.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=start, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(outcomes) == ["refused", "refused", "refused", "started"]
    assert stores[0].project_load(p.id).enqueued_tokens == {"m": 60}
