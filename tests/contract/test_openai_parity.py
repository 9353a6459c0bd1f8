"""OpenAI parity (issue 14): the 200 MB upload default, batch files expiring after 30 days by
default (and being deleted then), `expires_after` needing its anchor, and the 50,000-input
cap of `/v1/embeddings` batches.

The real app (`create_app`) and the real scheduler over each store of the contract suite,
driven in-process over HTTP with a settable clock.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import orjson
import pytest

from backfill.api.app import create_app
from backfill.api.context import ApiContext
from backfill.blobs import open_blobs
from backfill.blobs.base import Blobs
from backfill.scheduler.scheduler import Scheduler, delete_expired_files
from backfill.settings import Settings
from backfill.store import Store

KEY = "sk-contract-parity-0123456789"
HEADERS = {"authorization": f"Bearer {KEY}"}
EMBEDDINGS = "/v1/embeddings"
MODELS = {"e": frozenset({EMBEDDINGS}), "m": frozenset({"/v1/chat/completions"})}
T0 = 1_700_000_000
DAYS_30 = 30 * 86400


class Clock:
    def __init__(self) -> None:
        self.now: float = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class Env:
    client: httpx.AsyncClient
    store: Store
    blobs: Blobs
    settings: Settings
    clock: Clock


def run(
    store: Store, tmp_path: Path, use: Callable[[Env], Awaitable[None]], **overrides: Any
) -> None:
    project = store.ensure_project("alpha")
    store.add_api_key(project.id, hashlib.sha256(KEY.encode()).hexdigest(), 1)
    settings = Settings(data_dir=tmp_path, **overrides)
    clock = Clock()
    blobs = open_blobs("memory://", tmp_path)
    ctx = ApiContext(settings=settings, store=store, blobs=blobs, models=MODELS, clock=clock)

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=create_app(ctx))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await use(Env(client, store, blobs, settings, clock))

    asyncio.run(scenario())


def multipart(parts: list[tuple[str, str | None, bytes]]) -> bytes:
    out = b""
    for name, filename, value in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--B\r\nContent-Disposition: {disposition}\r\n".encode()
        if filename is not None:
            out += b"Content-Type: application/octet-stream\r\n"
        out += b"\r\n" + value + b"\r\n"
    return out + b"--B--\r\n"


async def upload(
    env: Env,
    data: bytes = b"{}\n",
    *,
    purpose: str = "batch",
    before: dict[str, str] | None = None,
    after: dict[str, str] | None = None,
) -> httpx.Response:
    """POST /v1/files with `before` fields ahead of the file part (as the SDK sends them) and
    `after` fields behind it (as a hand-made curl command may)."""
    parts: list[tuple[str, str | None, bytes]] = [("purpose", None, purpose.encode())]
    parts += [(k, None, v.encode()) for k, v in (before or {}).items()]
    parts.append(("file", "in.jsonl", data))
    parts += [(k, None, v.encode()) for k, v in (after or {}).items()]
    headers = {**HEADERS, "content-type": "multipart/form-data; boundary=B"}
    return await env.client.post("/v1/files", headers=headers, content=multipart(parts))


async def file_ids(env: Env) -> list[str]:
    r = await env.client.get("/v1/files", headers=HEADERS)
    assert r.status_code == 200, r.text
    return [f["id"] for f in r.json()["data"]]


# -- 1. upload limit ----------------------------------------------------------------------------


def test_default_upload_limit_is_200_mb_and_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BACKFILL_MAX_UPLOAD_BYTES", raising=False)
    assert Settings().max_upload_bytes == 200 * 1024 * 1024
    monkeypatch.setenv("BACKFILL_MAX_UPLOAD_BYTES", "1000")
    assert Settings().max_upload_bytes == 1000


# -- 2. batch files expire after 30 days by default ---------------------------------------------


def test_batch_files_expire_after_30_days_by_default(store: Store, tmp_path: Path) -> None:
    async def use(env: Env) -> None:
        batch = (await upload(env)).json()
        assert batch["expires_at"] == T0 + DAYS_30, batch
        assert batch["purpose"] == "batch"
        other = (await upload(env, purpose="user_data")).json()
        assert other["expires_at"] is None, other
        # An explicit expires_after wins over the default.
        explicit = await upload(
            env, before={"expires_after[anchor]": "created_at", "expires_after[seconds]": "7200"}
        )
        assert explicit.status_code == 200, explicit.text
        assert explicit.json()["expires_at"] == T0 + 7200
        retrieved = await env.client.get(f"/v1/files/{batch['id']}", headers=HEADERS)
        assert retrieved.json()["expires_at"] == T0 + DAYS_30

        # Retention deletes the default-expiring file once its 30 days are over, not before.
        record = env.store.get_file(batch["id"])
        assert record is not None
        await delete_expired_files(env.store, env.blobs, T0 + DAYS_30 - 1)
        assert batch["id"] in await file_ids(env)
        assert await env.blobs.get(record.blob_path) == b"{}\n"
        assert await delete_expired_files(env.store, env.blobs, T0 + DAYS_30) == 1
        assert await file_ids(env) == [other["id"]]
        gone = await env.client.get(f"/v1/files/{batch['id']}", headers=HEADERS)
        assert gone.status_code == 404, gone.text

    run(store, tmp_path, use)


@pytest.mark.parametrize("expiry", [0, None])
def test_default_batch_file_expiry_can_be_turned_off(
    store: Store, tmp_path: Path, expiry: int | None
) -> None:
    async def use(env: Env) -> None:
        r = await upload(env)
        assert r.status_code == 200, r.text
        assert r.json()["expires_at"] is None

    run(store, tmp_path, use, batch_file_expiry_seconds=expiry)


def test_default_batch_file_expiry_is_configurable(store: Store, tmp_path: Path) -> None:
    async def use(env: Env) -> None:
        assert (await upload(env)).json()["expires_at"] == T0 + 86400

    run(store, tmp_path, use, batch_file_expiry_seconds=86400)


# -- 3. expires_after needs its anchor ----------------------------------------------------------


def test_expires_after_seconds_without_anchor_is_a_400(store: Store, tmp_path: Path) -> None:
    async def use(env: Env) -> None:
        seconds = {"expires_after[seconds]": "7200"}
        for where, r in (
            ("before", await upload(env, before=seconds)),
            ("after", await upload(env, after=seconds)),
        ):
            assert r.status_code == 400, (where, r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["type"] == "invalid_request_error"
            assert error["param"] == "expires_after", error
            assert "anchor" in error["message"], error
        assert await file_ids(env) == []
        # The anchor may still come after the file when the seconds came before it.
        r = await upload(
            env,
            before={"expires_after[seconds]": "7200"},
            after={"expires_after[anchor]": "created_at"},
        )
        assert r.status_code == 200, r.text
        assert r.json()["expires_at"] == T0 + 7200

    run(store, tmp_path, use)


# -- 4. embeddings batches: at most 50,000 inputs ------------------------------------------------


def embed_line(custom_id: str, value: object) -> dict[str, object]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": EMBEDDINGS,
        "body": {"model": "e", "input": value},
    }


def jsonl(lines: list[dict[str, object]]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


async def validated(env: Env, lines: list[dict[str, object]]) -> dict[str, Any]:
    """Upload `lines`, create an embeddings batch and let the scheduler validate it."""
    file = await upload(env, jsonl(lines))
    assert file.status_code == 200, file.text
    body = {"input_file_id": file.json()["id"], "endpoint": EMBEDDINGS, "completion_window": "24h"}
    created = await env.client.post("/v1/batches", headers=HEADERS, json=body)
    assert created.status_code == 200, created.text
    batch_id = created.json()["id"]
    scheduler = Scheduler(env.settings, env.store, env.blobs, MODELS, env.clock)
    for _ in range(200):
        await scheduler.tick()
        await asyncio.sleep(0.02)
        got = (await env.client.get(f"/v1/batches/{batch_id}", headers=HEADERS)).json()
        if got["status"] != "validating":
            return dict(got)
    raise AssertionError(f"batch {batch_id} still validating")


#: 25,000 strings + 24,998 token arrays + 1 string + 1 token array (1 input) = 50,000 inputs
AT_THE_CAP: list[dict[str, object]] = [
    embed_line("strings", ["a"] * 25_000),
    embed_line("token-arrays", [[1, 2]] * 24_998),
    embed_line("one-string", "hello"),
    embed_line("one-token-array", [1, 2, 3]),
]


def test_embeddings_batch_at_50000_inputs_is_accepted(store: Store, tmp_path: Path) -> None:
    async def use(env: Env) -> None:
        batch = await validated(env, AT_THE_CAP)
        assert batch["status"] == "in_progress", batch
        assert batch["errors"] is None, batch
        assert batch["request_counts"]["total"] == 4

    run(store, tmp_path, use)


def test_embeddings_batch_over_50000_inputs_fails_validation(store: Store, tmp_path: Path) -> None:
    async def use(env: Env) -> None:
        batch = await validated(env, [*AT_THE_CAP, embed_line("one-more", "x")])
        assert batch["status"] == "failed", batch
        assert batch["failed_at"] is not None and batch["in_progress_at"] is None
        errors = batch["errors"]["data"]
        assert len(errors) == 1, errors
        error = errors[0]
        assert error["code"] == "too_many_tasks", error
        assert error["line"] == 5, error
        assert error["param"] == "body.input", error
        assert "50000" in error["message"] and "embedding inputs" in error["message"], error

    run(store, tmp_path, use)
