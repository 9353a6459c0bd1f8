"""Shared harness for the API tests: the real app in-process over HTTP (httpx ASGI transport),
on the in-memory store and blob store, with two projects and a fake clock.

Not a conftest (the API tests own only `test_api_*.py` files); test modules import `api_harness`
from here. It holds no tests itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
from fastapi import FastAPI

from backfill.api.app import create_app
from backfill.api.context import ApiContext
from backfill.blobs import ObjectBlobs, open_blobs
from backfill.domain.records import Project
from backfill.settings import Settings
from backfill.store.memory import MemoryStore

KEY = "sk-test-alpha-0123456789"
OTHER_KEY = "sk-test-beta-9876543210"
T0 = 1_700_000_000

ERROR_KEYS = {"message", "type", "param", "code"}
CHAT = frozenset({"/v1/chat/completions", "/v1/completions"})
EMBED = frozenset({"/v1/embeddings"})


@dataclass
class Clock:
    now: float = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class Api:
    client: httpx.AsyncClient
    store: MemoryStore
    blobs: ObjectBlobs
    ctx: ApiContext
    project: Project
    other: Project
    clock: Clock
    app: FastAPI
    headers: dict[str, str] = field(default_factory=lambda: {"authorization": f"Bearer {KEY}"})
    other_headers: dict[str, str] = field(
        default_factory=lambda: {"authorization": f"Bearer {OTHER_KEY}"}
    )

    async def upload(
        self,
        content: bytes,
        *,
        purpose: str | None = "batch",
        filename: str = "input.jsonl",
        headers: dict[str, str] | None = None,
        extra: dict[str, str] | None = None,
    ) -> httpx.Response:
        data = dict(extra or {})
        if purpose is not None:
            data["purpose"] = purpose
        return await self.client.post(
            "/v1/files",
            headers=headers or self.headers,
            data=data,
            files={"file": (filename, content, "application/jsonl")},
        )

    async def file_id(self, content: bytes = b'{"x": 1}\n', **kw: Any) -> str:
        r = await self.upload(content, **kw)
        assert r.status_code == 200, r.text
        return str(r.json()["id"])

    async def create_batch(
        self, headers: dict[str, str] | None = None, **body: Any
    ) -> httpx.Response:
        return await self.client.post("/v1/batches", headers=headers or self.headers, json=body)

    async def batch_id(self, **body: Any) -> str:
        if "input_file_id" not in body:
            body["input_file_id"] = await self.file_id()
        body.setdefault("endpoint", "/v1/chat/completions")
        body.setdefault("completion_window", "24h")
        r = await self.create_batch(**body)
        assert r.status_code == 200, r.text
        return str(r.json()["id"])


def assert_error(
    r: httpx.Response, status: int, *, param: Any = ..., code: Any = ..., type_: Any = ...
) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.headers["x-request-id"]
    body = r.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == ERROR_KEYS
    assert isinstance(error["message"], str) and error["message"]
    if param is not ...:
        assert error["param"] == param, error
    if code is not ...:
        assert error["code"] == code, error
    if type_ is not ...:
        assert error["type"] == type_, error
    return error


@asynccontextmanager
async def api_harness(
    tmp_path: Path, *, settings: Settings | None = None, **settings_overrides: Any
) -> AsyncIterator[Api]:
    store = MemoryStore()
    blobs = open_blobs("memory://", tmp_path)
    clock = Clock()
    project = store.ensure_project("alpha")
    other = store.ensure_project("beta")
    store.add_api_key(project.id, hashlib.sha256(KEY.encode()).hexdigest(), T0)
    store.add_api_key(other.id, hashlib.sha256(OTHER_KEY.encode()).hexdigest(), T0)
    ctx = ApiContext(
        settings=settings or Settings(data_dir=tmp_path, **settings_overrides),
        store=store,
        blobs=blobs,
        models={"llama": CHAT, "minilm": EMBED, "org/model-7b": CHAT},
        clock=clock,
    )
    app = create_app(ctx)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield Api(client, store, blobs, ctx, project, other, clock, app)


async def blob_paths(blobs: ObjectBlobs, prefix: str = "files") -> list[str]:
    import obstore

    paths: list[str] = []
    async for batch in obstore.list(blobs._store, prefix=prefix + "/"):
        paths.extend(m["path"] for m in batch)
    return paths
