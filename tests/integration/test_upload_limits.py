"""Uploads over `BACKFILL_MAX_UPLOAD_BYTES` are refused with 413 and leave nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from openai import APIStatusError, OpenAI
from sdk_helpers import upload
from suite_settings import MAX_UPLOAD_BYTES

from backfill.domain.paths import BATCHES, HEALTH
from backfill.testing.server import BackfillProcess


def blobs(server: BackfillProcess, under: str = "files") -> set[Path]:
    root = server.data_dir / "blobs" / under
    return {p for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def every_file_id(client: OpenAI) -> list[str]:
    return [f.id for f in client.files.list(limit=10_000)]


def test_upload_over_the_limit_is_413_and_stores_nothing(
    client: OpenAI, server: BackfillProcess
) -> None:
    upload(client, b"{}\n")  # so the blob folder exists before we look
    before_ids = every_file_id(client)
    before_blobs = blobs(server)
    assert before_blobs
    before_all = blobs(server, "")  # staging and the rest, too

    with pytest.raises(APIStatusError) as info:
        upload(client, b"x" * (MAX_UPLOAD_BYTES + 1), name="big.jsonl")
    err = info.value
    assert err.status_code == 413
    body = err.response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert str(MAX_UPLOAD_BYTES) in body["message"] or "1 MB" in body["message"], body
    assert err.response.headers["x-request-id"]

    assert every_file_id(client) == before_ids
    assert blobs(server) == before_blobs
    # no new file anywhere under blobs/ but the shared server's batch segments and readiness
    # probes, which its other batches may write meanwhile (a check for "big" in the name also
    # matched a random file id, file-...Ahbigu...)
    root = server.data_dir / "blobs"
    new = {p.relative_to(root) for p in blobs(server, "") - before_all}
    assert {p for p in new if p.parts[0] not in (BATCHES, HEALTH)} == set()


def test_upload_at_the_limit_is_accepted(client: OpenAI) -> None:
    file = upload(client, b"y" * MAX_UPLOAD_BYTES, name="exact.jsonl")
    assert file.bytes == MAX_UPLOAD_BYTES
    assert file.status == "processed"
    assert len(client.files.content(file.id).content) == MAX_UPLOAD_BYTES
    client.files.delete(file.id)
