"""`/v1/webhook_endpoints` through the official SDK on the shared server: create (the secret
once), list, retrieve, update, rotate, test, delete; project isolation; OpenAI's errors; and a
batch's end delivered to the endpoint, checked with the SDK's `webhooks.unwrap`."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import openai
import pytest
from openai import OpenAI
from openai.types.webhooks import BatchCompletedWebhookEvent
from polling import poll
from sdk_helpers import chat_line, run_batch
from webhook_receiver import Receiver

BATCH_EVENTS = ["batch.completed", "batch.failed", "batch.expired", "batch.cancelled"]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(secret="").start()
    yield r
    r.stop()


@pytest.fixture
def project(new_project: Callable[[str], OpenAI], request: pytest.FixtureRequest) -> OpenAI:
    return new_project("wh-" + request.node.name[5:30].replace("_", "-"))


def test_endpoint_lifecycle_through_the_sdk(
    project: OpenAI, client_b: OpenAI, receiver: Receiver
) -> None:
    made = project.webhooks.create(url=receiver.url, name="ci", event_types=BATCH_EVENTS)
    assert made.signing_secret.startswith("whsec_")
    assert (made.object, made.url, made.name, made.event_types) == (
        "webhook_endpoint", receiver.url, "ci", BATCH_EVENTS,
    )  # fmt: skip
    got = project.webhooks.retrieve(made.id)
    assert got.signing_secret_hint and made.signing_secret not in got.model_dump_json()
    second = project.webhooks.create(url=receiver.url, name="b", event_types=["batch.failed"])
    assert [e.id for e in project.webhooks.list()] == [second.id, made.id]  # newest first
    page = project.webhooks.list(limit=1)
    assert [e.id for e in page.data] == [second.id] and page.has_more
    assert [e.id for e in project.webhooks.list(after=second.id)] == [made.id]
    # another project sees none of it
    assert list(client_b.webhooks.list()) == []
    with pytest.raises(openai.NotFoundError):
        client_b.webhooks.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        client_b.webhooks.delete(made.id)

    changed = project.webhooks.update(made.id, event_types=["batch.completed"], name="ci2")
    assert (changed.event_types, changed.name) == (["batch.completed"], "ci2")

    receiver.secret = made.signing_secret
    result = project.webhooks.test(made.id, event_type="batch.completed")
    assert (result.status_code, result.event_type, result.webhook_endpoint_id) == (
        200, "batch.completed", made.id,
    )  # fmt: skip
    assert receiver.deliveries[-1].error is None  # the SDK's unwrap took it

    rotated = project.webhooks.rotate_secret(made.id, keep_old_secret_active_for_24_hours=True)
    assert rotated.signing_secret not in (made.signing_secret, None)
    # while the old secret is kept, a receiver with either secret accepts
    for secret in (made.signing_secret, rotated.signing_secret):
        receiver.secret = secret
        assert project.webhooks.test(made.id, event_type="batch.failed").status_code == 200
    assert [d.error for d in receiver.deliveries[-2:]] == [None, None]
    dropped = project.webhooks.rotate_secret(made.id)
    receiver.secret = rotated.signing_secret  # no longer kept
    assert project.webhooks.test(made.id, event_type="batch.failed").status_code == 400
    receiver.secret = dropped.signing_secret
    assert project.webhooks.test(made.id, event_type="batch.failed").status_code == 200

    deleted = project.webhooks.delete(made.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (
        made.id, True, "webhook_endpoint.deleted",
    )  # fmt: skip
    with pytest.raises(openai.NotFoundError):
        project.webhooks.retrieve(made.id)
    assert [e.id for e in project.webhooks.list()] == [second.id]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"url": "ftp://x", "name": "n", "event_types": ["batch.completed"]}, "url"),
        ({"url": "http://127.0.0.1:9/", "name": "n", "event_types": ["video.completed"]},
         "event_types"),
        ({"url": "http://127.0.0.1:9/", "name": "n", "event_types": []}, "event_types"),
        ({"url": "http://127.0.0.1:9/", "name": "n"}, "event_types"),
        ({"url": "http://127.0.0.1:9/", "event_types": ["batch.failed"], "extra": 1}, "extra"),
    ],
)  # fmt: skip
def test_bad_endpoints_get_openai_errors(
    project: OpenAI, body: dict[str, object], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        project.post("/webhook_endpoints", body=body, cast_to=object)
    error = caught.value.body
    assert isinstance(error, dict) and error.get("param") == param, error
    assert list(project.webhooks.list()) == []


def test_an_unreachable_endpoint_test_is_a_502(project: OpenAI) -> None:
    made = project.webhooks.create(
        url="http://127.0.0.1:9/nothing-listens", name="x", event_types=["batch.completed"]
    )
    with pytest.raises(openai.APIStatusError) as caught:
        project.with_options(max_retries=0).webhooks.test(made.id, event_type="batch.completed")
    assert caught.value.status_code == 502


def test_a_finished_batch_is_delivered(project: OpenAI, receiver: Receiver) -> None:
    made = project.webhooks.create(url=receiver.url, name="done", event_types=BATCH_EVENTS)
    receiver.secret = made.signing_secret
    batch = run_batch(project, [chat_line("a", "hello there"), chat_line("b", "again")])
    assert batch.status == "completed"
    [d] = poll(lambda: receiver.accepted, what="the batch.completed delivery")
    assert isinstance(d.event, BatchCompletedWebhookEvent)
    assert d.event.data.id == batch.id and d.event.id == d.webhook_id
    assert batch.completed_at is not None and d.event.created_at == batch.completed_at
