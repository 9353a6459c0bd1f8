"""OpenAI parity (issue 14): the 200 MB upload default, batch files expiring after 30 days by
default (and being deleted then), `expires_after` needing its anchor, the 50,000-input
cap of `/v1/embeddings` batches, and the `/v1/responses` and `/v1/moderations` batch endpoints.

The real app (`create_app`) and the real scheduler over each store of the contract suite,
driven in-process over HTTP with a settable clock. The batch endpoints' round trips run a real
`backfill serve` (its own SQLite store) against the echo upstream and the simulator, through the
official `openai` SDK; `tests/local/test_local_responses.py` does the same for the in-process
chat engine.
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
from openai import OpenAI
from openai.types import ModerationCreateResponse
from openai.types.responses import Response
from sdk_helpers import read_jsonl, run_batch

from backfill.api.app import create_app
from backfill.api.context import ApiContext
from backfill.blobs import open_blobs
from backfill.blobs.base import Blobs
from backfill.scheduler.scheduler import Scheduler, delete_expired_files
from backfill.settings import Settings
from backfill.sim.process import SimProcess, start_sim
from backfill.store import Store
from backfill.testing import UpstreamProcess, start_upstream
from backfill.testing.server import BackfillProcess

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
    store: Store,
    tmp_path: Path,
    use: Callable[[Env], Awaitable[None]],
    *,
    models: dict[str, frozenset[str]] = MODELS,
    **overrides: Any,
) -> None:
    project = store.ensure_project("alpha")
    store.add_api_key(project.id, hashlib.sha256(KEY.encode()).hexdigest(), 1)
    settings = Settings(data_dir=tmp_path, **overrides)
    clock = Clock()
    blobs = open_blobs("memory://", tmp_path)
    ctx = ApiContext(settings=settings, store=store, blobs=blobs, models=models, clock=clock)

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


# -- 5. /v1/responses and /v1/moderations batches -----------------------------------------------

RESPONSES = "/v1/responses"
MODERATIONS = "/v1/moderations"
SERVER_ENV = {
    "BACKFILL_SHARD_SIZE": "3",
    "BACKFILL_FLUSH_EVERY_SECONDS": "0.1",
    "BACKFILL_SCHEDULER_INTERVAL": "0.1",
}


def test_moderations_batch_without_a_model_serving_it_is_a_400(
    store: Store, tmp_path: Path
) -> None:
    async def use(env: Env) -> None:
        file = await upload(env, b'{"custom_id": "a"}\n')
        body = {
            "input_file_id": file.json()["id"],
            "endpoint": MODERATIONS,
            "completion_window": "24h",
        }
        r = await env.client.post("/v1/batches", headers=HEADERS, json=body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["type"], error["param"], error["code"]) == (
            "invalid_request_error",
            "endpoint",
            "unsupported_endpoint",
        )
        assert "No model configured on this server serves /v1/moderations" in error["message"]

    run(store, tmp_path, use)


def test_responses_batch_is_accepted_where_a_model_serves_it(store: Store, tmp_path: Path) -> None:
    async def use(env: Env) -> None:
        file = await upload(env, b'{"custom_id": "a"}\n')
        body = {
            "input_file_id": file.json()["id"],
            "endpoint": RESPONSES,
            "completion_window": "24h",
        }
        r = await env.client.post("/v1/batches", headers=HEADERS, json=body)
        assert r.status_code == 200, r.text
        assert r.json()["endpoint"] == RESPONSES

    run(store, tmp_path, use, models={**MODELS, "up": frozenset({RESPONSES})})


@dataclass
class Servers:
    client: OpenAI
    upstream: UpstreamProcess
    sim: SimProcess


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """`backfill serve` with three upstream models: `m` on the echo upstream (the default
    endpoints, `/v1/responses` among them), `mod` on the echo upstream declaring only
    `/v1/moderations`, and `s` on the simulator."""
    data = tmp_path_factory.mktemp("parity-serve")
    with start_upstream() as upstream, start_sim(speedup=50, model_name="s") as sim:
        config = data / "backfill.toml"
        config.write_text(
            f'[models.m]\nurl = "{upstream.url}"\n'
            f'[models.mod]\nurl = "{upstream.url}"\nendpoints = ["{MODERATIONS}"]\n'
            f'[models.s]\nurl = "{sim.url}"\n'
        )
        with BackfillProcess(
            data, api_keys=[KEY], extra_args=["--config", str(config)], env=SERVER_ENV
        ) as server:
            client = OpenAI(base_url=server.base_url, api_key=KEY, max_retries=1, timeout=15.0)
            yield Servers(client, upstream, sim)


def responses_line(custom_id: str, model: str, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": RESPONSES,
        "body": {"model": model, **body},
    }


def test_responses_batch_to_an_upstream_through_the_sdk(servers: Servers) -> None:
    lines = [
        responses_line("text", "m", input="one two three"),
        responses_line(
            "items",
            "m",
            instructions="Be brief.",
            input=[{"role": "user", "content": [{"type": "input_text", "text": "four five"}]}],
            max_output_tokens=50,
        ),
        # the echo upstream serves text only: its 400 goes to the error file as it came
        responses_line("tools", "m", input="x", tools=[{"type": "web_search"}]),
    ]
    batch = run_batch(servers.client, lines, endpoint=RESPONSES)
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 1)
    assert batch.output_file_id is not None and batch.error_file_id is not None
    out = {r["custom_id"]: r for r in read_jsonl(servers.client, batch.output_file_id)}
    assert set(out) == {"text", "items"}
    bodies = {cid: r["response"]["body"] for cid, r in out.items()}
    for body in bodies.values():
        assert body["object"] == "response" and body["id"].startswith("resp_")
        assert body["status"] == "completed"
        Response.model_validate(body)
    assert Response.model_validate(bodies["text"]).output_text == "echo: one two three"
    assert Response.model_validate(bodies["items"]).output_text == "echo: four five"
    assert bodies["text"]["usage"]["input_tokens"] == 3
    assert bodies["text"]["usage"]["output_tokens"] == 4
    # the batch's usage sums the lines' Responses usage (input/output tokens)
    usage = batch.usage
    assert usage is not None
    want_in = sum(b["usage"]["input_tokens"] for b in bodies.values())
    want_out = sum(b["usage"]["output_tokens"] for b in bodies.values())
    assert (usage.input_tokens, usage.output_tokens) == (want_in, want_out)
    assert usage.total_tokens == want_in + want_out and want_in > 0
    errors = read_jsonl(servers.client, batch.error_file_id)
    assert [e["custom_id"] for e in errors] == ["tools"]
    assert errors[0]["response"]["status_code"] == 400
    assert errors[0]["response"]["body"]["error"]["param"] == "tools"


def test_responses_batch_to_the_simulator(servers: Servers) -> None:
    lines = [
        responses_line(f"r{i}", "s", input=f"question {i}", max_output_tokens=5) for i in range(4)
    ]
    batch = run_batch(servers.client, lines, endpoint=RESPONSES)
    assert batch.status == "completed", batch
    assert batch.output_file_id is not None and batch.error_file_id is None
    bodies = [r["response"]["body"] for r in read_jsonl(servers.client, batch.output_file_id)]
    assert len(bodies) == 4
    for body in bodies:
        assert body["object"] == "response"
        # the simulator always generates max_output_tokens tokens: cut at the limit
        assert body["status"] == "incomplete"
        assert body["incomplete_details"] == {"reason": "max_output_tokens"}
        assert body["usage"]["output_tokens"] == 5
        Response.model_validate(body)
    assert batch.usage is not None and batch.usage.output_tokens == 20
    assert batch.usage.input_tokens == sum(b["usage"]["input_tokens"] for b in bodies)


def test_moderations_batch_to_an_upstream_that_serves_it(servers: Servers) -> None:
    lines = [
        {
            "custom_id": "one",
            "method": "POST",
            "url": MODERATIONS,
            "body": {"model": "mod", "input": "hello"},
        },
        {
            "custom_id": "two",
            "method": "POST",
            "url": MODERATIONS,
            "body": {"model": "mod", "input": ["fine", "bad #flag"]},
        },
    ]
    batch = run_batch(servers.client, lines, endpoint=MODERATIONS)
    assert batch.status == "completed", batch
    assert batch.output_file_id is not None and batch.error_file_id is None
    out = {
        r["custom_id"]: r["response"]["body"]
        for r in read_jsonl(servers.client, batch.output_file_id)
    }
    one = ModerationCreateResponse.model_validate(out["one"])
    two = ModerationCreateResponse.model_validate(out["two"])
    assert one.model == "mod" and [r.flagged for r in one.results] == [False]
    assert [r.flagged for r in two.results] == [False, True]


def test_moderations_batch_for_a_model_that_does_not_serve_it_fails(servers: Servers) -> None:
    line = {
        "custom_id": "a",
        "method": "POST",
        "url": MODERATIONS,
        "body": {"model": "m", "input": "x"},
    }
    batch = run_batch(servers.client, [line], endpoint=MODERATIONS)
    assert batch.status == "failed", batch
    assert batch.errors is not None and batch.errors.data is not None
    error = batch.errors.data[0]
    assert (error.code, error.line, error.param) == ("model_not_found", 1, "body.model")
    assert error.message == "The model 'm' does not serve /v1/moderations."


def test_responses_line_without_input_fails_validation(servers: Servers) -> None:
    batch = run_batch(servers.client, [responses_line("a", "m")], endpoint=RESPONSES)
    assert batch.status == "failed", batch
    assert batch.errors is not None and batch.errors.data is not None
    error = batch.errors.data[0]
    assert (error.code, error.param) == ("missing_required_parameter", "body.input")


def test_real_time_gateway_relays_responses_to_an_upstream(servers: Servers) -> None:
    answer = servers.client.responses.create(model="m", input="six seven")
    assert answer.object == "response" and answer.output_text == "echo: six seven"
    assert answer.usage is not None and answer.usage.input_tokens == 2
