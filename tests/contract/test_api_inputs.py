"""Text no store can keep (NUL, lone surrogates) is a 400 in the OpenAI envelope on every store
backend: PostgreSQL used to answer 500 where SQLite and memory answered 404 or 200.

The real app (`create_app`) over each store of the contract suite, driven in-process over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from backfill.api.app import create_app
from backfill.api.context import ApiContext
from backfill.api.text import check_json_text, check_text
from backfill.blobs import open_blobs
from backfill.errors import InvalidRequest
from backfill.settings import Settings
from backfill.store import Store

KEY = "sk-contract-inputs-0123456789"
CHAT = frozenset({"/v1/chat/completions"})
HEADERS = {"authorization": f"Bearer {KEY}"}

Call = Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]


def run_api(
    store: Store, tmp_path: Path, use: Callable[[httpx.AsyncClient], Awaitable[None]]
) -> None:
    project = store.ensure_project("alpha")
    store.add_api_key(project.id, hashlib.sha256(KEY.encode()).hexdigest(), 1)
    ctx = ApiContext(
        settings=Settings(data_dir=tmp_path),
        store=store,
        blobs=open_blobs("memory://", tmp_path),
        models={"m": CHAT},
    )

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=create_app(ctx))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await use(client)

    asyncio.run(scenario())


def assert_bad_text(r: httpx.Response, param: str) -> None:
    assert r.status_code == 400, r.text
    error: dict[str, Any] = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert "NUL" in error["message"] or "Unicode" in error["message"], error


URLS = [
    ("GET", "/v1/files/file-a%00b", "file_id"),
    ("GET", "/v1/files/file-a%00b/content", "file_id"),
    ("DELETE", "/v1/files/file-a%00b", "file_id"),
    ("GET", "/v1/files?after=file-%00", "after"),
    ("GET", "/v1/files?purpose=batch%00", "purpose"),
    ("GET", "/v1/batches/batch_%00x", "batch_id"),
    ("GET", "/v1/batch/jobs/batch_%00x", "batch_id"),
    ("POST", "/v1/batches/batch_%00x/cancel", "batch_id"),
    ("GET", "/v1/batches/batch_%00x/output", "batch_id"),
    ("GET", "/v1/batches?after=batch_%00", "after"),
    ("GET", "/v1/models/m%00", "model_id"),
]


@pytest.mark.parametrize(("method", "url", "param"), URLS)
def test_nul_in_path_or_query_is_a_400(
    store: Store, tmp_path: Path, method: str, url: str, param: str
) -> None:
    async def use(client: httpx.AsyncClient) -> None:
        assert_bad_text(await client.request(method, url, headers=HEADERS), param)

    run_api(store, tmp_path, use)


def test_nul_in_create_batch_body_is_a_400(store: Store, tmp_path: Path) -> None:
    async def use(client: httpx.AsyncClient) -> None:
        good = {"endpoint": "/v1/chat/completions", "completion_window": "24h"}
        bodies = [
            ({**good, "input_file_id": "file-\u0000"}, "input_file_id"),
            ({**good, "input_file_id": "file-x", "metadata": {"k\u0000": "v"}}, "metadata"),
            ({**good, "input_file_id": "file-x", "metadata": {"k": "v\u0000"}}, "metadata"),
        ]
        for body, param in bodies:
            r = await client.post("/v1/batches", headers=HEADERS, json=body)
            assert_bad_text(r, param)
        listed = await client.get("/v1/batches", headers=HEADERS)
        assert listed.status_code == 200 and listed.json()["data"] == []

    run_api(store, tmp_path, use)


def test_nul_in_a_filename_is_a_400_and_stores_nothing(store: Store, tmp_path: Path) -> None:
    async def use(client: httpx.AsyncClient) -> None:
        body = (
            b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            b'--B\r\nContent-Disposition: form-data; name="file"; filename="in\x00.jsonl"\r\n'
            b"Content-Type: application/jsonl\r\n\r\n{}\n\r\n--B--\r\n"
        )
        headers = {**HEADERS, "content-type": "multipart/form-data; boundary=B"}
        r = await client.post("/v1/files", headers=headers, content=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "file"
        listed = await client.get("/v1/files", headers=HEADERS)
        assert listed.status_code == 200 and listed.json()["data"] == []

    run_api(store, tmp_path, use)


def test_ordinary_text_still_works(store: Store, tmp_path: Path) -> None:
    async def use(client: httpx.AsyncClient) -> None:
        for url in ("/v1/files?after=file-unknown&purpose=batch", "/v1/batches?after=batch_x"):
            r = await client.get(url, headers=HEADERS)
            assert r.status_code == 200, r.text
        r = await client.get("/v1/files/file-caf%C3%A9", headers=HEADERS)
        assert r.status_code == 404, r.text

    run_api(store, tmp_path, use)


def test_store_backstop_turns_bad_text_into_invalid_request(store: Store) -> None:
    """Should a path skip the API's check, no backend answers 500: a miss or a 400."""
    project = store.ensure_project("alpha")
    for bad in ("a\x00b", "\ud800"):
        reads = (lambda b=bad: store.get_file(b), lambda b=bad: store.get_batch(b, project.id))
        for read in reads:
            with contextlib.suppress(InvalidRequest):  # a 400 is fine; a miss must be None
                assert read() is None


def test_check_text() -> None:
    assert check_text("batch_abc é 日本", "p") == "batch_abc é 日本"
    for bad in ("a\x00", "\ud800x", "\udfff"):
        with pytest.raises(InvalidRequest) as info:
            check_text(bad, "Idempotency-Key")
        assert info.value.param == "Idempotency-Key"
    with pytest.raises(InvalidRequest):
        check_json_text({"a": [{"b": "ok"}, {"c\x00": 1}]}, "metadata")
