"""Files API details (Range, delete, processing), idempotency, metadata, aliases, models."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest
from openai import ConflictError, NotFoundError, OpenAI
from sdk_helpers import CHAT, chat_line, jsonl, read_jsonl, upload, wait_batch
from suite_settings import KEY_A, MODELS

from backfill.testing.server import BackfillProcess

CONTENT = jsonl([chat_line(f"r{i}", f"text {i}") for i in range(3)])


def raw(
    server: BackfillProcess,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    key: str = KEY_A,
) -> tuple[int, dict[str, str], bytes]:
    """A curl-style request: (status, lower-cased headers, body); errors are returned too."""
    req = urllib.request.Request(
        server.base_url + path,
        method=method,
        data=body,
        headers={"Authorization": f"Bearer {key}", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def raw_json(server: BackfillProcess, method: str, path: str, **kw: Any) -> tuple[int, Any]:
    status, headers, data = raw(server, method, path, **kw)
    assert headers["content-type"].startswith("application/json"), headers
    assert headers["x-request-id"]
    return status, json.loads(data)


def test_file_object_and_retrieve(client: OpenAI) -> None:
    file = upload(client, CONTENT, name="three.jsonl")
    assert file.id.startswith("file-")
    assert file.object == "file"
    assert file.bytes == len(CONTENT)
    assert file.filename == "three.jsonl"
    assert file.purpose == "batch"
    assert file.status == "processed"
    assert file.created_at > 1_600_000_000
    got = client.files.retrieve(file.id)
    assert got.model_dump() == file.model_dump()
    assert client.files.wait_for_processing(file.id, poll_interval=0.05).status == "processed"
    assert client.files.content(file.id).content == CONTENT


def test_file_expires_after(client: OpenAI) -> None:
    file = client.files.create(
        file=("exp.jsonl", CONTENT),
        purpose="batch",
        expires_after={"anchor": "created_at", "seconds": 3600},
    )
    assert file.expires_at == file.created_at + 3600


def test_content_range(client: OpenAI, server: BackfillProcess) -> None:
    file = upload(client, CONTENT)
    n = len(CONTENT)

    status, headers, body = raw(
        server, "GET", f"/files/{file.id}/content", headers={"Range": "bytes=0-9"}
    )
    assert status == 206
    assert body == CONTENT[:10]
    assert headers["content-range"] == f"bytes 0-9/{n}"
    assert headers["content-length"] == "10"

    status, headers, body = raw(
        server, "GET", f"/files/{file.id}/content", headers={"Range": "bytes=10-"}
    )
    assert (status, body) == (206, CONTENT[10:])
    assert headers["content-range"] == f"bytes 10-{n - 1}/{n}"

    status, headers, body = raw(
        server, "GET", f"/files/{file.id}/content", headers={"Range": "bytes=-5"}
    )
    assert (status, body) == (206, CONTENT[-5:])

    status, headers, _ = raw(
        server, "GET", f"/files/{file.id}/content", headers={"Range": f"bytes={n}-"}
    )
    assert status == 416
    assert headers["content-range"] == f"bytes */{n}"

    status, headers, body = raw(server, "GET", f"/files/{file.id}/content")
    assert (status, body) == (200, CONTENT)
    assert headers["content-length"] == str(n)


def test_delete_file(client: OpenAI, server: BackfillProcess) -> None:
    file = upload(client, CONTENT)
    status, body = raw_json(server, "DELETE", f"/files/{file.id}")
    assert status == 200
    assert body == {"id": file.id, "object": "file", "deleted": True}
    for call in (
        lambda: client.files.retrieve(file.id),
        lambda: client.files.content(file.id),
        lambda: client.files.delete(file.id),
    ):
        with pytest.raises(NotFoundError):
            call()
    assert file.id not in {f.id for f in client.files.list(limit=10_000)}


def test_sdk_delete(client: OpenAI) -> None:
    file = upload(client, CONTENT)
    deleted = client.files.delete(file.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (file.id, "file", True)


def test_idempotency_key_returns_the_same_batch(client: OpenAI, client_b: OpenAI) -> None:
    file = upload(client, CONTENT)
    key = {"Idempotency-Key": f"k1-{file.id}"}
    first = client.batches.create(
        input_file_id=file.id, endpoint=CHAT, completion_window="24h", extra_headers=key
    )
    second = client.batches.create(
        input_file_id=file.id, endpoint=CHAT, completion_window="24h", extra_headers=key
    )
    assert second.id == first.id
    assert second.created_at == first.created_at
    without = client.batches.create(input_file_id=file.id, endpoint=CHAT, completion_window="24h")
    assert without.id != first.id

    # same key, different body: a conflict, not a silent reuse
    with pytest.raises(ConflictError) as info:
        client.batches.create(
            input_file_id=file.id,
            endpoint=CHAT,
            completion_window="24h",
            metadata={"different": "body"},
            extra_headers=key,
        )
    assert info.value.response.headers["x-should-retry"] == "false"

    # the key is scoped to the project
    other_file = upload(client_b, CONTENT)
    other = client_b.batches.create(
        input_file_id=other_file.id, endpoint=CHAT, completion_window="24h", extra_headers=key
    )
    assert other.id != first.id
    wait_batch(client, first.id)
    wait_batch(client, without.id)
    wait_batch(client_b, other.id)


def test_metadata_round_trips(client: OpenAI) -> None:
    file = upload(client, CONTENT)
    metadata = {"team": "eval", "sweep": "temperature=0.7", "k" * 64: "v" * 512}
    batch = client.batches.create(
        input_file_id=file.id, endpoint=CHAT, completion_window="24h", metadata=metadata
    )
    assert batch.metadata == metadata
    done = wait_batch(client, batch.id)
    assert done.metadata == metadata
    listed = next(b for b in client.batches.list(limit=100) if b.id == batch.id)
    assert listed.metadata == metadata


def test_batch_jobs_alias(client: OpenAI, server: BackfillProcess) -> None:
    file = upload(client, CONTENT)
    payload = {"input_file_id": file.id, "endpoint": CHAT, "completion_window": "24h"}
    status, created = raw_json(
        server,
        "POST",
        "/batch/jobs",
        body=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    assert status == 200, created
    assert created["object"] == "batch"
    assert created["id"].startswith("batch_")
    assert created["status"] == "validating"
    assert created["input_file_id"] == file.id

    status, got = raw_json(server, "GET", f"/batch/jobs/{created['id']}")
    assert status == 200
    assert got["id"] == created["id"]

    status, listed = raw_json(server, "GET", "/batch/jobs?limit=100")
    assert status == 200
    assert listed["object"] == "list"
    assert created["id"] in [b["id"] for b in listed["data"]]
    assert set(listed) >= {"object", "data", "first_id", "last_id", "has_more"}

    done = wait_batch(client, created["id"])
    assert done.status == "completed"
    assert done.output_file_id is not None
    assert [o["custom_id"] for o in read_jsonl(client, done.output_file_id)] == ["r0", "r1", "r2"]

    status, missing = raw_json(server, "GET", "/batch/jobs/batch_nope")
    assert status == 404
    assert set(missing["error"]) == {"message", "type", "param", "code"}


def test_curl_style_create_without_content_type(client: OpenAI, server: BackfillProcess) -> None:
    file = upload(client, CONTENT)
    payload = {"input_file_id": file.id, "endpoint": CHAT, "completion_window": "24h"}
    status, created = raw_json(server, "POST", "/batches", body=json.dumps(payload).encode())
    assert status == 200, created
    assert wait_batch(client, created["id"]).status == "completed"


def test_models_list(client: OpenAI) -> None:
    models = client.models.list()
    assert sorted(m.id for m in models) == sorted(MODELS)
    for m in models:
        assert m.object == "model"
    assert client.models.retrieve("m").id == "m"
    with pytest.raises(NotFoundError):
        client.models.retrieve("no-such-model")


def test_bad_requests_are_synchronous_400_or_404(client: OpenAI) -> None:
    from openai import BadRequestError

    file = upload(client, CONTENT)
    with pytest.raises(NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint=CHAT, completion_window="24h")
    with pytest.raises(BadRequestError):
        client.batches.create(
            input_file_id=file.id,
            endpoint="/v1/unknown",  # type: ignore[arg-type]
            completion_window="24h",
        )
    with pytest.raises(BadRequestError) as info:  # no model here declares it
        client.batches.create(
            input_file_id=file.id, endpoint="/v1/moderations", completion_window="24h"
        )
    assert info.value.response.json()["error"]["message"]
    output = upload(client, CONTENT, purpose="fine-tune")
    with pytest.raises(BadRequestError):
        client.batches.create(input_file_id=output.id, endpoint=CHAT, completion_window="24h")


def test_range_on_an_output_file(client: OpenAI, server: BackfillProcess) -> None:
    batch = wait_batch(
        client,
        client.batches.create(
            input_file_id=upload(client, CONTENT).id, endpoint=CHAT, completion_window="24h"
        ).id,
    )
    assert batch.output_file_id is not None
    full = client.files.content(batch.output_file_id).content
    n = len(full)
    status, headers, body = raw(
        server,
        "GET",
        f"/files/{batch.output_file_id}/content",
        headers={"Range": f"bytes=5-{n + 100}"},
    )
    assert (status, body) == (206, full[5:])
    assert headers["content-range"] == f"bytes 5-{n - 1}/{n}"


def test_idempotency_key_after_the_batch_finished(client: OpenAI) -> None:
    file = upload(client, CONTENT)
    key = {"Idempotency-Key": f"later-{file.id}"}
    first = client.batches.create(
        input_file_id=file.id, endpoint=CHAT, completion_window="24h", extra_headers=key
    )
    done = wait_batch(client, first.id)
    again = client.batches.create(
        input_file_id=file.id, endpoint=CHAT, completion_window="24h", extra_headers=key
    )
    assert again.id == first.id
    assert again.status == done.status == "completed"


def test_list_parameter_bounds(client: OpenAI, server: BackfillProcess) -> None:
    from openai import BadRequestError

    with pytest.raises(BadRequestError):
        client.files.list(limit=10_001)
    with pytest.raises(BadRequestError):
        client.files.list(order="sideways")  # type: ignore[arg-type]
    assert len(client.files.list(limit=10_000).data) >= 1
