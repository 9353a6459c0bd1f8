"""Webhooks from a real `backfill serve`, killed with -9 between a batch's end and the
delivery of its event: the outbox in the store still delivers after the restart, under the
event's one `webhook-id`, checked by a receiver with the official SDK's `webhooks.unwrap`."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from acceptance_settings import FAST_ENV
from openai import OpenAI
from openai.types.webhooks import BatchCompletedWebhookEvent
from polling import poll
from sdk_helpers import chat_line, run_batch
from webhook_receiver import Receiver

from backfill.testing import UpstreamProcess
from backfill.testing.server import BackfillProcess

KEY = "sk-acceptance-webhooks"
EVENTS = ["batch.completed", "batch.failed", "batch.expired", "batch.cancelled"]
WEBHOOK_ENV = {
    **FAST_ENV,
    "BACKFILL_WEBHOOK_INTERVAL": "0.1",
    "BACKFILL_WEBHOOK_RETRY_FIRST_SECONDS": "0.3",
    "BACKFILL_WEBHOOK_RETRY_MAX_SECONDS": "1",
    "BACKFILL_WEBHOOK_TIMEOUT_SECONDS": "1",  # a claim then holds 2 x 1 + 5 s
}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(secret="").start()
    yield r
    if r.hang is not None:
        r.hang.set()
    r.stop()


def start(
    servers: list[BackfillProcess], data_dir: Path, upstream: UpstreamProcess
) -> tuple[BackfillProcess, OpenAI]:
    proc = BackfillProcess(data_dir, api_keys=[KEY], models=[f"m={upstream.url}"], env=WEBHOOK_ENV)
    servers.append(proc)
    proc.start()
    return proc, OpenAI(base_url=proc.base_url, api_key=KEY, max_retries=1, timeout=15.0)


def test_killed_while_the_receiver_fails_delivers_after_restart(
    tmp_path: Path, upstream: UpstreamProcess, servers: list[BackfillProcess], receiver: Receiver
) -> None:
    first, client = start(servers, tmp_path, upstream)
    endpoint = client.webhooks.create(url=receiver.url, name="r", event_types=EVENTS)
    receiver.secret = endpoint.signing_secret
    receiver.fail_with = 503
    batches = [run_batch(client, [chat_line(f"{n}-a", "hello")]) for n in range(3)]
    assert {b.status for b in batches} == {"completed"}
    poll(lambda: receiver.attempts() >= 3, what="the first (refused) attempts")
    first.kill()
    refused = receiver.attempts()
    receiver.fail_with = None
    second, client = start(servers, tmp_path, upstream)
    poll(lambda: len(receiver.accepted) >= 3, what="every event accepted after the restart")
    second.stop()
    assert sorted(Counter(receiver.accepted_ids).values()) == [1, 1, 1]
    assert {d.event.data.id for d in receiver.accepted} == {b.id for b in batches}  # type: ignore[union-attr]
    assert all(isinstance(d.event, BatchCompletedWebhookEvent) for d in receiver.accepted)
    # each event kept its one id from the refused attempts before the kill to the last one
    assert {d.webhook_id for d in receiver.deliveries[:refused]} <= set(receiver.accepted_ids)


def test_killed_mid_attempt_delivers_again_under_the_same_id(
    tmp_path: Path, upstream: UpstreamProcess, servers: list[BackfillProcess], receiver: Receiver
) -> None:
    first, client = start(servers, tmp_path, upstream)
    endpoint = client.webhooks.create(url=receiver.url, name="r", event_types=EVENTS)
    receiver.secret = endpoint.signing_secret
    receiver.hang = threading.Event()  # the first attempt is held, unanswered
    batch = run_batch(client, [chat_line("only", "hello")])
    assert batch.status == "completed"
    poll(lambda: receiver.arrived >= 1, what="an attempt, held by the receiver")
    assert receiver.deliveries == []  # not answered yet
    first.kill()  # the attempt's outcome is never recorded
    receiver.hang.set()  # the held request is answered to nobody
    receiver.hang = None
    second, client = start(servers, tmp_path, upstream)
    poll(lambda: len(receiver.accepted) >= 2, timeout=60, what="the attempt made again")
    second.stop()
    ids = receiver.accepted_ids
    assert ids[0] == ids[1]  # the same event: a receiver keeping ids drops the repeat
    assert {d.event.data.id for d in receiver.accepted} == {batch.id}  # type: ignore[union-attr]


def cli(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "backfill.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_cli_endpoints_take_effect_while_the_server_runs(
    tmp_path: Path, upstream: UpstreamProcess, servers: list[BackfillProcess], receiver: Receiver
) -> None:
    _, client = start(servers, tmp_path, upstream)
    data = ["--data-dir", str(tmp_path)]
    added = cli("webhooks", "add", receiver.url, "--project", "default", "--name", "ci", *data)
    endpoint_id = added.split()[3]
    receiver.secret = added.split("shown once): ")[1].strip()
    assert endpoint_id.startswith("whep_") and receiver.secret.startswith("whsec_")
    failed = run_batch(client, [chat_line("x", "hi", model="unknown")])  # no restart
    assert failed.status == "failed"
    [d] = poll(lambda: receiver.accepted, what="the batch.failed delivery")
    assert (d.event.type, d.event.data.id) == ("batch.failed", failed.id)  # type: ignore[union-attr]
    listing = cli("webhooks", "list", *data)
    assert endpoint_id in listing and "1/0/0" in listing, listing
    assert failed.id in cli("webhooks", "deliveries", "--endpoint", endpoint_id, *data)
    assert "Removed" in cli("webhooks", "remove", endpoint_id, *data)
    assert endpoint_id not in cli("webhooks", "list", *data)
    after = run_batch(client, [chat_line("y", "hi")])
    # removed: the next batch's end makes no delivery (the outbox row would have been written
    # with its status, so the store says so at once, not after some wait for the receiver)
    assert after.id not in cli("webhooks", "deliveries", *data)
    assert len(receiver.deliveries) == 1


def test_config_file_endpoints(
    tmp_path: Path, upstream: UpstreamProcess, servers: list[BackfillProcess], receiver: Receiver
) -> None:
    receiver.secret = cli("webhooks", "secret").strip()
    config = tmp_path / "backfill.toml"
    config.write_text(
        f'[[webhooks]]\nurl = "{receiver.url}"\nsecret = "{receiver.secret}"\n'
        'events = ["batch.completed"]\n'
    )
    proc = BackfillProcess(
        tmp_path,
        api_keys=[KEY],
        models=[f"m={upstream.url}"],
        env=WEBHOOK_ENV,
        extra_args=["--config", str(config)],
    )
    servers.append(proc)
    proc.start()
    client = OpenAI(base_url=proc.base_url, api_key=KEY, max_retries=1, timeout=15.0)
    failed = run_batch(client, [chat_line("x", "hi", model="unknown")])  # failed: not wanted
    done = run_batch(client, [chat_line("y", "hi")])
    [d] = poll(lambda: receiver.accepted, what="the batch.completed delivery")
    assert d.event.data.id == done.id  # type: ignore[union-attr]
    made = cli("webhooks", "deliveries", "--data-dir", str(tmp_path))
    assert done.id in made and failed.id not in made  # batch.failed: no delivery written
    [listed] = client.webhooks.list()
    assert listed.url == receiver.url
    with pytest.raises(openai.ConflictError):
        client.webhooks.delete(listed.id)  # the file's: changed there
