"""The webhook deliverer against a real receiver on loopback that checks each delivery with the
official SDK's `webhooks.unwrap`: signatures, OpenAI's event body, retries with backoff after a
failing receiver, one `webhook-id` per event, giving up, and two deliverers sharing an outbox.
The store is real SQLite; batches are ended through the store as the scheduler ends them."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai.types.webhooks import BatchCancelledWebhookEvent, BatchCompletedWebhookEvent
from polling import poll_async
from webhook_receiver import Receiver

from backfill.domain.ids import new_batch_id
from backfill.domain.records import BatchRecord, Shard
from backfill.domain.statuses import BatchStatus as S
from backfill.settings import Settings
from backfill.store.base import Store
from backfill.store.sql import SqlStore
from backfill.webhooks.deliverer import Deliverer
from backfill.webhooks.endpoints import make_endpoint

FAST = {
    "webhook_interval": 0.05,
    "webhook_retry_first_seconds": 0.2,
    "webhook_retry_max_seconds": 0.8,
    "webhook_timeout_seconds": 5.0,
}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStore]:
    s = SqlStore(f"sqlite:///{tmp_path / 'store.db'}")
    s.migrate()
    yield s
    s.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(secret="").start()
    yield r
    r.stop()


def subscribe(store: Store, receiver: Receiver, project: str = "p") -> None:
    p = store.ensure_project(project)
    e = make_endpoint(p.id, receiver.url, int(time.time()))
    store.add_webhook_endpoint(e)
    receiver.secret = e.secret


def end_batch(store: Store, project: str, to: S) -> str:
    p = store.ensure_project(project)
    now = int(time.time())
    batch = store.insert_batch(
        BatchRecord(
            id=new_batch_id(),
            project_id=p.id,
            endpoint="/v1/chat/completions",
            input_file_id="file-x",
            completion_window="24h",
            status=S.VALIDATING,
            created_at=now,
            expires_at=now + 86400,
        )
    )
    shard = Shard(batch.id, 0, first_line=1, start=0, end=10, count=1)
    assert store.start_batch(batch.id, [shard], model="m", total=1, now=now)
    if to is S.COMPLETED:
        assert store.transition(batch.id, [S.IN_PROGRESS], S.FINALIZING, finalizing_at=now)
        assert store.transition(batch.id, [S.FINALIZING], S.COMPLETED, completed_at=now)
    else:
        assert store.transition(batch.id, [S.IN_PROGRESS], S.CANCELLING, cancelling_at=now)
        assert store.transition(batch.id, [S.CANCELLING], S.CANCELLED, cancelled_at=now)
    return batch.id


async def delivering(store: Store, **settings: object) -> tuple[asyncio.Event, asyncio.Task[None]]:
    stop = asyncio.Event()
    deliverer = Deliverer(Settings(**{**FAST, **settings}), store)  # type: ignore[arg-type]
    return stop, asyncio.create_task(deliverer.run(stop))


@pytest.mark.anyio
async def test_deliveries_pass_the_sdk_unwrap(store: SqlStore, receiver: Receiver) -> None:
    subscribe(store, receiver)
    done, cancelled = end_batch(store, "p", S.COMPLETED), end_batch(store, "p", S.CANCELLED)
    stop, task = await delivering(store)
    try:
        await poll_async(lambda: len(receiver.accepted) == 2)
    finally:
        stop.set()
        await task
    events = {type(d.event): d.event for d in receiver.accepted}
    assert [d.error for d in receiver.deliveries] == [None, None]
    completed = events[BatchCompletedWebhookEvent]
    assert isinstance(completed, BatchCompletedWebhookEvent)
    assert (completed.type, completed.data.id, completed.object) == (
        "batch.completed", done, "event",
    )  # fmt: skip
    assert events[BatchCancelledWebhookEvent].data.id == cancelled  # type: ignore[union-attr]
    for d in receiver.accepted:
        assert d.webhook_id == d.event.id  # type: ignore[union-attr]
        assert d.headers["webhook-signature"].startswith("v1,")
        assert d.headers["content-type"] == "application/json"
    assert {d.state for d in store.webhook_deliveries()} == {"delivered"}


@pytest.mark.anyio
async def test_a_stop_lets_the_attempt_in_flight_be_recorded(
    store: SqlStore, receiver: Receiver
) -> None:
    subscribe(store, receiver)
    receiver.hang = threading.Event()  # the receiver holds the request
    end_batch(store, "p", S.COMPLETED)
    stop, task = await delivering(store)
    await poll_async(lambda: receiver.arrived == 1)
    stop.set()  # shutdown while the attempt waits for its answer
    threading.Timer(0.3, receiver.hang.set).start()
    await task
    assert len(receiver.accepted) == 1
    # recorded as delivered: a restart does not send it again
    assert [d.state for d in store.webhook_deliveries()] == ["delivered"]


@pytest.mark.anyio
async def test_a_wrong_secret_is_refused_by_the_sdk(store: SqlStore, receiver: Receiver) -> None:
    subscribe(store, receiver)
    receiver.secret = make_endpoint("x", receiver.url, 0).secret  # not the endpoint's
    end_batch(store, "p", S.COMPLETED)
    stop, task = await delivering(store)
    try:
        await poll_async(lambda: receiver.attempts() >= 1)
    finally:
        stop.set()
        await task
    assert receiver.accepted == []
    assert "signature" in (receiver.deliveries[0].error or "").lower()


@pytest.mark.anyio
async def test_a_failing_receiver_gets_each_event_once_when_it_recovers(
    store: SqlStore, receiver: Receiver
) -> None:
    subscribe(store, receiver)
    receiver.fail_with = 503
    batches = [end_batch(store, "p", S.COMPLETED) for _ in range(5)]
    stop, task = await delivering(store)
    try:
        # every event refused a few times, each time under its one id
        await poll_async(lambda: receiver.attempts() >= 15, timeout=60)
        receiver.fail_with = None
        await poll_async(lambda: len(receiver.accepted) == 5, timeout=60)
    finally:
        stop.set()
        await task
    per_id = Counter(d.webhook_id for d in receiver.deliveries)
    assert len(per_id) == 5 and min(per_id.values()) >= 2  # retried under the same id
    assert sorted(Counter(receiver.accepted_ids).values()) == [1] * 5  # accepted once each
    assert sorted(d.event.data.id for d in receiver.accepted) == sorted(batches)  # type: ignore[union-attr]
    rows = store.webhook_deliveries()
    assert {r.state for r in rows} == {"delivered"}
    assert all(r.attempts == per_id[r.event_id] for r in rows)


@pytest.mark.anyio
async def test_an_event_too_old_is_given_up(store: SqlStore, receiver: Receiver) -> None:
    subscribe(store, receiver)
    receiver.fail_with = 500
    end_batch(store, "p", S.COMPLETED)
    stop, task = await delivering(store, webhook_give_up_seconds=1.0)
    try:
        await poll_async(lambda: [d.state for d in store.webhook_deliveries()] == ["failed"])
    finally:
        stop.set()
        await task
    [row] = store.webhook_deliveries()
    # (on a busy machine the first attempt may already come after the deadline)
    assert row.last_status == 500 and row.attempts == receiver.attempts() >= 1


@pytest.mark.anyio
async def test_two_deliverers_share_the_outbox(tmp_path: Path, receiver: Receiver) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    stores = [SqlStore(url), SqlStore(url)]
    stores[0].migrate()
    try:
        subscribe(stores[0], receiver)
        batches = [end_batch(stores[0], "p", S.COMPLETED) for _ in range(20)]
        runs = [await delivering(s) for s in stores]
        try:
            await poll_async(lambda: len(receiver.accepted) >= 20)
        finally:
            for stop, _ in runs:
                stop.set()
            await asyncio.gather(*(task for _, task in runs))
        assert sorted(Counter(receiver.accepted_ids).values()) == [1] * 20
        assert len(receiver.deliveries) == 20
        assert {d.event.data.id for d in receiver.accepted} == set(batches)  # type: ignore[union-attr]
    finally:
        for s in stores:
            s.close()
