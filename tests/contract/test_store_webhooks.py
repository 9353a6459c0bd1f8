"""The webhook outbox on every store backend: endpoints, events written with the terminal
status change (once), claims several processes share, fenced outcomes."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from test_store import make_batch, started

from backfill.domain.statuses import BatchStatus as S
from backfill.domain.webhooks import EVENT_TYPES, WebhookEndpoint, new_endpoint_id, new_secret
from backfill.store import Store

if TYPE_CHECKING:
    from conftest import Backend

T0 = 1_700_000_000


def endpoint(
    store: Store, project: str, url: str = "http://127.0.0.1:9/hook", **kw: object
) -> WebhookEndpoint:
    p = store.ensure_project(project)
    e = WebhookEndpoint(
        id=new_endpoint_id(),
        project_id=p.id,
        url=url,
        secret=new_secret(),
        event_types=kw.pop("event_types", EVENT_TYPES),  # type: ignore[arg-type]
        created_at=T0,
        **kw,  # type: ignore[arg-type]
    )
    store.add_webhook_endpoint(e)
    return e


def complete(store: Store, batch_id: str, at: int = T0 + 100) -> None:
    assert store.transition(batch_id, [S.IN_PROGRESS], S.FINALIZING, finalizing_at=at)
    assert store.transition(batch_id, [S.FINALIZING], S.COMPLETED, completed_at=at)


def test_endpoints_add_list_get_remove(store: Store) -> None:
    a = endpoint(store, "a", name="ci")
    b = endpoint(store, "b")
    assert [e.id for e in store.webhook_endpoints()] == [a.id, b.id]
    assert [e.id for e in store.webhook_endpoints(a.project_id)] == [a.id]
    got = store.get_webhook_endpoint(a.id)
    assert got is not None
    assert (got.url, got.secret, got.event_types, got.name, got.project) == (
        a.url, a.secret, EVENT_TYPES, "ci", "a",
    )  # fmt: skip
    assert store.get_webhook_endpoint(a.id, b.project_id) is None  # another project's
    assert store.remove_webhook_endpoint(a.id, T0 + 5, b.project_id) is None
    removed = store.remove_webhook_endpoint(a.id, T0 + 5)
    assert removed is not None and removed.removed_at == T0 + 5
    assert store.remove_webhook_endpoint(a.id, T0 + 6) is None  # once
    assert store.get_webhook_endpoint(a.id) is None
    assert [e.id for e in store.webhook_endpoints()] == [b.id]


def test_update_and_rotation(store: Store) -> None:
    a = endpoint(store, "a")
    other = store.ensure_project("b")
    assert store.update_webhook_endpoint(a.id, T0 + 1, other.id, name="x") is None
    same = store.update_webhook_endpoint(a.id, T0 + 1)  # nothing to change
    assert same is not None and same.updated_at == T0
    new = new_secret()
    changed = store.update_webhook_endpoint(
        a.id,
        T0 + 2,
        url="http://127.0.0.1:9/other",
        event_types=("batch.failed",),
        secret=new,
        previous_secret=a.secret,
        previous_secret_until=T0 + 100,
    )
    assert changed is not None
    assert (changed.url, changed.event_types, changed.secret, changed.updated_at) == (
        "http://127.0.0.1:9/other", ("batch.failed",), new, T0 + 2,
    )  # fmt: skip
    assert changed.secrets_at(T0 + 99) == (new, a.secret)
    assert changed.secrets_at(T0 + 100) == (new,)
    # both secrets sign a delivery claimed while the old one is kept
    p = store.ensure_project("a")
    failed = make_batch(store, p, 1)
    assert store.transition(failed.id, [S.VALIDATING], S.FAILED, failed_at=T0 + 50)
    [d] = store.claim_webhook_deliveries("t", T0 + 50, 30, 10)
    assert d.secrets == (new, a.secret) and d.url == "http://127.0.0.1:9/other"
    store.remove_webhook_endpoint(a.id, T0 + 60)
    assert store.update_webhook_endpoint(a.id, T0 + 61, name="gone") is None


def test_terminal_status_writes_one_delivery_per_wanting_endpoint(store: Store) -> None:
    p = store.ensure_project("p")
    every = endpoint(store, "p")
    only_failed = endpoint(store, "p", event_types=("batch.failed",))
    other = endpoint(store, "q")
    batch = started(store, p, 1)
    assert store.webhook_deliveries() == []  # nothing before the end
    complete(store, batch.id)
    [d] = store.webhook_deliveries()
    assert (d.endpoint_id, d.event_type, d.batch_id, d.created_at) == (
        every.id, "batch.completed", batch.id, T0 + 100,
    )  # fmt: skip
    assert d.state == "pending" and d.attempts == 0
    assert d.body() == {
        "id": d.event_id,
        "object": "event",
        "type": "batch.completed",
        "created_at": T0 + 100,
        "data": {"id": batch.id},
    }
    # a failed batch goes to both of p's endpoints, under one event id
    failed = make_batch(store, p, 2)
    assert store.transition(failed.id, [S.VALIDATING], S.FAILED, failed_at=T0 + 200)
    ds = store.webhook_deliveries(batch_id=failed.id)
    assert {x.endpoint_id for x in ds} == {every.id, only_failed.id}
    assert len({x.event_id for x in ds}) == 1
    assert other.id not in {x.endpoint_id for x in store.webhook_deliveries()}


def test_no_event_for_a_refused_or_a_non_terminal_change(store: Store) -> None:
    p = store.ensure_project("p")
    endpoint(store, "p")
    batch = started(store, p, 1)
    assert store.transition(batch.id, [S.IN_PROGRESS], S.CANCELLING, cancelling_at=T0)
    assert store.webhook_deliveries() == []
    assert store.transition(batch.id, [S.CANCELLING], S.CANCELLED, cancelled_at=T0 + 1)
    assert store.transition(batch.id, [S.CANCELLING], S.CANCELLED, cancelled_at=T0 + 2) is None
    assert [d.event_type for d in store.webhook_deliveries()] == ["batch.cancelled"]


def test_claim_attempt_and_outcomes(store: Store) -> None:
    p = store.ensure_project("p")
    e = endpoint(store, "p")
    complete(store, started(store, p, 1).id)
    assert store.claim_webhook_deliveries("t1", T0 + 99, 30, 10) == []  # not yet due
    [d] = store.claim_webhook_deliveries("t1", T0 + 100, 30, 10)
    assert (d.url, d.secrets, d.attempts) == (e.url, (e.secret,), 1)
    assert store.claim_webhook_deliveries("t2", T0 + 101, 30, 10) == []  # held
    # a failed attempt: due again at retry_at, same event id
    assert store.finish_webhook_delivery(
        d.id, "t1", T0 + 102, delivered=False, status=500, error="HTTP 500", retry_at=T0 + 110
    )
    assert not store.finish_webhook_delivery(d.id, "t1", T0 + 103, delivered=True)  # spent
    assert store.claim_webhook_deliveries("t2", T0 + 109, 30, 10) == []
    [again] = store.claim_webhook_deliveries("t2", T0 + 110, 30, 10)
    assert (again.id, again.event_id, again.attempts) == (d.id, d.event_id, 2)
    assert not store.finish_webhook_delivery(d.id, "t1", T0 + 111, delivered=True)  # not t1's
    assert store.finish_webhook_delivery(d.id, "t2", T0 + 111, delivered=True, status=204)
    [done] = store.webhook_deliveries()
    assert (done.state, done.delivered_at, done.last_status, done.attempts) == (
        "delivered", T0 + 111, 204, 2,
    )  # fmt: skip
    assert store.claim_webhook_deliveries("t3", T0 + 10_000, 30, 10) == []


def test_a_lapsed_claim_is_taken_again_and_the_old_holder_is_fenced(store: Store) -> None:
    p = store.ensure_project("p")
    endpoint(store, "p")
    complete(store, started(store, p, 1).id)
    [d] = store.claim_webhook_deliveries("dead", T0 + 100, 30, 10)  # then killed
    [d2] = store.claim_webhook_deliveries("alive", T0 + 131, 30, 10)
    assert (d2.event_id, d2.attempts) == (d.event_id, 2)
    assert not store.finish_webhook_delivery(d.id, "dead", T0 + 132, delivered=True)
    assert store.finish_webhook_delivery(d.id, "alive", T0 + 132, delivered=True)


def test_give_up_and_removed_endpoint(store: Store) -> None:
    p = store.ensure_project("p")
    kept, gone = endpoint(store, "p"), endpoint(store, "p")
    complete(store, started(store, p, 1).id)
    [a, b] = sorted(store.claim_webhook_deliveries("t", T0 + 100, 30, 10), key=lambda x: x.id)
    assert store.finish_webhook_delivery(a.id, "t", T0 + 101, delivered=False, error="refused")
    assert store.finish_webhook_delivery(
        b.id, "t", T0 + 101, delivered=False, error="x", retry_at=T0 + 105
    )
    assert store.remove_webhook_endpoint(gone.id, T0 + 102)
    assert store.claim_webhook_deliveries("t", T0 + 106, 30, 10) == []  # b ends: endpoint gone
    states = {d.endpoint_id: (d.state, d.last_error) for d in store.webhook_deliveries()}
    assert states == {kept.id: ("failed", "refused"), gone.id: ("failed", "endpoint removed")}
    assert store.prune_webhook_deliveries(T0 + 101) == 2
    assert store.webhook_deliveries() == []


def test_delivery_counts_by_state_and_the_last_error(store: Store) -> None:
    p = store.ensure_project("p")
    e, quiet = endpoint(store, "p"), endpoint(store, "p")
    for n in range(4):
        complete(store, started(store, p, n + 1).id, at=T0 + 100 + n)
    assert store.webhook_delivery_counts(e.id) == {"delivered": 0, "pending": 4, "failed": 0}
    mine = sorted(
        (d for d in store.claim_webhook_deliveries("t", T0 + 200, 30, 10) if d.endpoint_id == e.id),
        key=lambda d: d.id,
    )
    assert store.finish_webhook_delivery(mine[0].id, "t", T0 + 201, delivered=True, status=204)
    assert store.finish_webhook_delivery(mine[1].id, "t", T0 + 201, delivered=False, error="old")
    assert store.finish_webhook_delivery(mine[2].id, "t", T0 + 202, delivered=False, error="new")
    assert store.finish_webhook_delivery(
        mine[3].id, "t", T0 + 203, delivered=False, error=None, retry_at=T0 + 300
    )
    assert store.webhook_delivery_counts(e.id) == {"delivered": 1, "pending": 1, "failed": 2}
    assert store.webhook_delivery_counts(quiet.id) == {"delivered": 0, "pending": 4, "failed": 0}
    assert store.webhook_delivery_counts("whep_none") == {"delivered": 0, "pending": 0, "failed": 0}
    [last] = store.webhook_deliveries(endpoint_id=e.id, with_error=True, limit=1)
    assert (last.id, last.last_error) == (mine[2].id, "new")
    assert store.webhook_deliveries(endpoint_id=quiet.id, with_error=True) == []


def test_pending_deliveries_are_not_pruned(store: Store) -> None:
    p = store.ensure_project("p")
    endpoint(store, "p")
    complete(store, started(store, p, 1).id)
    assert store.prune_webhook_deliveries(T0 + 10**6) == 0
    assert len(store.webhook_deliveries()) == 1


def test_claims_from_many_processes_never_overlap(backend: Backend) -> None:
    stores = [backend.store() for _ in range(4)]
    p = stores[0].ensure_project("p")
    for _ in range(3):
        endpoint(stores[0], "p")
    for n in range(10):
        complete(stores[0], started(stores[0], p, n, shards=1).id)
    taken: list[list[int]] = [[] for _ in stores]
    barrier = threading.Barrier(len(stores))

    def claim(i: int) -> None:
        barrier.wait(timeout=30)
        while True:
            got = stores[i].claim_webhook_deliveries(f"t{i}", T0 + 1000, 60, 2)
            if not got:
                return
            taken[i].extend(d.id for d in got)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    every = [x for got in taken for x in got]
    assert len(every) == 30 and len(set(every)) == 30
