"""Webhooks without sockets: the retry schedule, secrets, the signature the SDK checks, and the
config file's endpoints kept in step with the store."""

from __future__ import annotations

import base64
import time

import openai
import pytest

from backfill.domain.webhooks import RetryPolicy, check_secret, new_secret
from backfill.errors import InvalidRequest
from backfill.settings import WebhookConfig, load_config_file
from backfill.store.memory import MemoryStore
from backfill.webhooks.endpoints import make_endpoint, sync_config_endpoints
from backfill.webhooks.signing import signed_headers


def test_retry_delays_double_from_five_seconds_to_an_hour() -> None:
    policy = RetryPolicy()
    assert [policy.delay(n) for n in range(1, 13)] == [
        5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600, 3600,
    ]  # fmt: skip
    assert policy.delay(10_000) == 3600


def test_retries_stop_when_the_event_is_72_hours_old() -> None:
    policy = RetryPolicy()
    created = 1_000_000.0
    assert policy.next_attempt(created, 1, created + 1) == created + 6
    last_hour = created + 72 * 3600 - 3600
    assert policy.next_attempt(created, 30, last_hour) == created + 72 * 3600
    assert policy.next_attempt(created, 30, last_hour + 1) is None
    # attempts over 72 hours at the default schedule: 11 to reach the cap, then hourly
    n, t = 1, created
    while (nxt := policy.next_attempt(created, n, t)) is not None:
        n, t = n + 1, nxt
    assert n == 11 + 70 and t <= created + 72 * 3600


def test_secrets_are_standard_webhooks_secrets() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 32
    assert check_secret(secret) == secret
    for bad in ("sk-x", "whsec_!!!", "whsec_" + base64.b64encode(b"short").decode()):
        with pytest.raises(ValueError):
            check_secret(bad)


def test_the_sdk_accepts_a_signature_and_refuses_a_changed_body() -> None:
    secret, other = new_secret(), new_secret()
    body = (
        b'{"id":"evt_1","object":"event","type":"batch.completed","created_at":1,'
        b'"data":{"id":"batch_1"}}'
    )
    headers = signed_headers([secret], "evt_1", body, time.time())
    client = openai.OpenAI(api_key="x", base_url="http://127.0.0.1:9/v1")
    event = client.webhooks.unwrap(body, headers, secret=secret)
    assert (event.type, event.data.id) == ("batch.completed", "batch_1")
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.unwrap(body.replace(b"batch_1", b"batch_2"), headers, secret=secret)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.unwrap(body, headers, secret=other)
    # two secrets (a rotation that keeps the old one): either one verifies
    both = signed_headers([other, secret], "evt_1", body, time.time())
    assert len(both["webhook-signature"].split(" ")) == 2
    for s in (secret, other):
        client.webhooks.unwrap(body, both, secret=s)
    # signed too long ago: refused (each attempt is signed at its own time)
    stale = signed_headers([secret], "evt_1", body, time.time() - 600)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.unwrap(body, stale, secret=secret)


def test_config_endpoints_follow_the_file() -> None:
    store = MemoryStore()
    a = WebhookConfig(url="http://127.0.0.1:9/a", secret=new_secret(), project="p")
    b = WebhookConfig(
        url="http://127.0.0.1:9/b", secret=new_secret(), project="q", events=["batch.failed"]
    )
    mine = make_endpoint(store.ensure_project("p").id, "http://127.0.0.1:9/mine", 1)
    store.add_webhook_endpoint(mine)
    sync_config_endpoints(store, [a, b], 10)
    first = {e.url: e for e in store.webhook_endpoints()}
    assert set(first) == {mine.url, a.url, b.url}
    assert (first[b.url].project, first[b.url].event_types, first[b.url].source) == (
        "q", ("batch.failed",), "config",
    )  # fmt: skip
    sync_config_endpoints(store, [a, b], 20)  # a restart with the same file: the same endpoints
    assert {e.id for e in store.webhook_endpoints()} == {e.id for e in first.values()}
    changed = a.model_copy(update={"secret": new_secret()})
    sync_config_endpoints(store, [changed], 30)  # b taken out, a's secret changed
    now = {e.url: e for e in store.webhook_endpoints()}
    assert set(now) == {mine.url, a.url}
    assert now[a.url].secret == changed.secret and now[a.url].id != first[a.url].id
    assert now[mine.url].id == mine.id  # made with the CLI: never touched by the file


def test_bad_config_endpoints_are_refused() -> None:
    store = MemoryStore()
    with pytest.raises(InvalidRequest, match="event types"):
        sync_config_endpoints(
            store,
            [WebhookConfig(url="http://x/", secret=new_secret(), events=["video.completed"])],
            1,
        )
    with pytest.raises(InvalidRequest, match="whsec_"):
        sync_config_endpoints(store, [WebhookConfig(url="http://x/", secret="nope")], 1)
    with pytest.raises(InvalidRequest, match="URL"):
        sync_config_endpoints(store, [WebhookConfig(url="x", secret=new_secret())], 1)


def test_the_config_file_form(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "c.toml"
    secret = new_secret()
    path.write_text(
        f'[[webhooks]]\nurl = "http://127.0.0.1:9/h"\nsecret = "{secret}"\nproject = "p"\n'
        'events = ["batch.completed"]\n'
    )
    [hook] = load_config_file(path)["webhooks"]
    assert (hook.url, hook.secret, hook.project, hook.events) == (
        "http://127.0.0.1:9/h", secret, "p", ["batch.completed"],
    )  # fmt: skip


def test_a_bad_config_entry_leaves_the_stored_endpoints_alone() -> None:
    store = MemoryStore()
    good = WebhookConfig(url="http://127.0.0.1:9/a", secret=new_secret(), project="p")
    sync_config_endpoints(store, [good], 1)
    before = [e.id for e in store.webhook_endpoints()]
    bad = WebhookConfig(url="nope", secret=new_secret(), project="q")
    moved = good.model_copy(update={"url": "http://127.0.0.1:9/b"})
    with pytest.raises(InvalidRequest, match="URL"):
        sync_config_endpoints(store, [moved, bad], 2)
    assert [e.id for e in store.webhook_endpoints()] == before  # nothing removed
    assert [p.name for p, _ in store.projects()] == ["p"]  # no project made for the bad one
