"""Keys and projects: 401 with the OpenAI envelope, and other projects' ids are plain 404s."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest
from openai import AuthenticationError, NotFoundError, OpenAI
from sdk_helpers import chat_line, jsonl, run_batch, submit, upload

from backfill.testing.server import BackfillProcess

ENVELOPE_KEYS = {"message", "type", "param", "code"}


@pytest.mark.parametrize("key", ["sk-wrong-key-000000", ""])
def test_bad_or_missing_key_is_401(server: BackfillProcess, key: str) -> None:
    bad = OpenAI(base_url=server.base_url, api_key=key or "placeholder", max_retries=0)
    headers = {"Authorization": ""} if not key else {}
    with pytest.raises(AuthenticationError) as info:
        bad.files.list(extra_headers=headers)
    err = info.value
    assert err.status_code == 401
    assert err.response.headers.get("x-request-id")
    body = err.response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == ENVELOPE_KEYS
    assert body["error"]["message"]
    assert body["error"]["code"] == ("invalid_api_key" if key else "missing_api_key")


def test_no_authorization_header_raw(server: BackfillProcess) -> None:
    req = urllib.request.Request(server.base_url + "/batches")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    assert info.value.code == 401
    assert info.value.headers["x-request-id"]
    assert info.value.headers["content-type"].startswith("application/json")
    body = json.loads(info.value.read())
    assert set(body["error"]) == ENVELOPE_KEYS
    assert body["error"]["code"] == "missing_api_key"


def test_health_needs_no_key(server: BackfillProcess) -> None:
    with urllib.request.urlopen(f"http://{server.host}:{server.port}/health", timeout=10) as r:
        assert r.status == 200
        assert r.headers["x-request-id"]


def test_other_projects_objects_are_404(client: OpenAI, client_b: OpenAI) -> None:
    batch = run_batch(client, [chat_line("a", "private")])
    assert batch.status == "completed"
    assert batch.output_file_id is not None
    file_id = batch.input_file_id

    for call in (
        lambda: client_b.files.retrieve(file_id),
        lambda: client_b.files.content(file_id),
        lambda: client_b.files.delete(file_id),
        lambda: client_b.files.retrieve(batch.output_file_id or ""),
        lambda: client_b.files.content(batch.output_file_id or ""),
        lambda: client_b.batches.retrieve(batch.id),
        lambda: client_b.batches.cancel(batch.id),
    ):
        with pytest.raises(NotFoundError) as info:
            call()
        assert info.value.status_code == 404
        assert set(info.value.response.json()["error"]) == ENVELOPE_KEYS

    # nothing was deleted or changed by the attempts
    assert client.files.retrieve(file_id).id == file_id
    assert client.files.content(file_id).content
    assert client.batches.retrieve(batch.id).status == "completed"


def test_cannot_create_batch_from_another_projects_file(client: OpenAI, client_b: OpenAI) -> None:
    file = upload(client, jsonl([chat_line("a", "x")]))
    with pytest.raises(NotFoundError):
        client_b.batches.create(
            input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
        )


def test_lists_are_per_project(new_project: Callable[[str], OpenAI]) -> None:
    alice = new_project("alice")
    bob = new_project("bob")
    a_batch = submit(alice, [chat_line("a", "x")])
    b_batch = submit(bob, [chat_line("b", "y")])

    assert [b.id for b in alice.batches.list()] == [a_batch.id]
    assert [b.id for b in bob.batches.list()] == [b_batch.id]
    assert [f.id for f in alice.files.list(purpose="batch")] == [a_batch.input_file_id]
    assert [f.id for f in bob.files.list(purpose="batch")] == [b_batch.input_file_id]


def test_unknown_route_is_404_envelope(server: BackfillProcess) -> None:
    req = urllib.request.Request(
        server.base_url + "/no-such-thing", headers={"Authorization": "Bearer x"}
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    assert info.value.code == 404
    assert info.value.headers["x-request-id"]
    assert set(json.loads(info.value.read())["error"]) == ENVELOPE_KEYS


def test_upload_without_purpose_or_file_is_400(client: OpenAI) -> None:
    from openai import BadRequestError

    with pytest.raises(BadRequestError):
        client.files.create(file=("x.jsonl", b"{}\n"), purpose="not-a-purpose")  # type: ignore[arg-type]
    with pytest.raises(BadRequestError):
        client.post("/files", body={"purpose": "batch"}, cast_to=object)
