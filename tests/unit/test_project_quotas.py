"""Project quotas without sockets: how a batch's tokens are counted, the validation duty's
check against the store, and the settings that apply without a restart (worker weights,
real-time limits) read again after their cache time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from backfill.api.realtime import ProjectLimits, RateLimiter
from backfill.blobs import open_blobs
from backfill.domain.ordering import merged_weights
from backfill.domain.projects import ProjectSettings
from backfill.domain.records import BatchRecord, FileRecord
from backfill.domain.statuses import BatchStatus
from backfill.domain.validation import (
    InputValidator,
    ValidationLimits,
    output_cap,
    request_tokens,
)
from backfill.errors import RateLimited
from backfill.scheduler.validator import validate_batch
from backfill.settings import Settings
from backfill.store.memory import MemoryStore
from backfill.worker.worker import Worker

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def chat(cid: str, content: str, **body: Any) -> bytes:
    b = {"model": "m", "messages": [{"role": "user", "content": content}], **body}
    return orjson.dumps({"custom_id": cid, "method": "POST", "url": CHAT, "body": b})


# -- counting ------------------------------------------------------------------------------


def test_output_caps() -> None:
    assert output_cap(CHAT, {"max_completion_tokens": 7, "max_tokens": 9}) == 7
    assert output_cap(CHAT, {"max_tokens": 9}, 100) == 9
    assert output_cap("/v1/responses", {"max_output_tokens": 5}, 100) == 5
    assert output_cap(CHAT, {"max_tokens": 9, "n": 3}) == 27
    assert output_cap(CHAT, {}, 100) == 100  # no cap: the default
    assert output_cap(COMPLETIONS, {}, 100) == 16  # that API's own default
    assert output_cap(EMBEDDINGS, {"max_tokens": 9}, 100) == 0
    assert output_cap(CHAT, {"max_tokens": True}, 100) == 100  # not a number


def test_prompt_by_the_counter_else_estimated() -> None:
    raw = b"x" * 400
    body = {"max_tokens": 10}
    assert request_tokens(CHAT, raw, body) == 100 + 10  # ~4 bytes a token
    assert request_tokens(CHAT, raw, body, lambda e, b: 3) == 3 + 10
    assert request_tokens(CHAT, raw, body, lambda e, b: None) == 110  # cannot tell

    def broken(endpoint: str, body: dict[str, Any]) -> int | None:
        raise RuntimeError("tokenizer tripped")

    assert request_tokens(CHAT, raw, body, broken) == 110


def test_validator_counts_each_line_with_its_models_counter() -> None:
    seen: list[str] = []

    def counter(endpoint: str, body: dict[str, Any]) -> int:
        seen.append(body["messages"][0]["content"])
        return len(body["messages"][0]["content"].split())

    v = InputValidator(
        batch_id="batch_x",
        endpoint=CHAT,
        served={"m": frozenset({CHAT})},
        limits=ValidationLimits(default_output_tokens=50),
        token_counters={"m": counter},
    )
    v.feed(chat("a", "one two three", max_tokens=4) + b"\n" + chat("b", "four"))
    result = v.finish()
    assert result.ok
    assert seen == ["one two three", "four"]
    assert result.estimated_tokens == (3 + 4) + (1 + 50)


# -- the validation duty against the store -------------------------------------------------


async def _validate(store: MemoryStore, tmp: Path, project_id: str, n: int, **kw: Any) -> Any:
    blobs = open_blobs("memory://", tmp)
    data = b"\n".join(chat(f"r{i}", "hello world", max_tokens=100) for i in range(2))
    await blobs.put(f"files/f{n}", data)
    store.insert_file(
        FileRecord(f"file-{n}", project_id, "in.jsonl", "batch", len(data), 0, f"files/f{n}")
    )
    batch = store.insert_batch(
        BatchRecord(
            f"batch_{n}", project_id, CHAT, f"file-{n}", "24h", BatchStatus.VALIDATING, 0, 10**10
        )
    )
    return await validate_batch(
        store, blobs, batch, {"m": frozenset({CHAT})}, ValidationLimits(), 1, **kw
    )


@pytest.mark.anyio
async def test_the_duty_records_counted_tokens_and_fails_over_the_limit(tmp_path: Path) -> None:
    store = MemoryStore()
    p = store.ensure_project("alpha")
    counter = {"m": lambda endpoint, body: 5}
    started = await _validate(store, tmp_path, p.id, 1, token_counters=counter)
    assert started.status is BatchStatus.IN_PROGRESS
    assert store.project_load(p.id).enqueued_tokens == {"m": 2 * (5 + 100)}

    store.set_project_settings("alpha", ProjectSettings(token_limits={"m": 300}))
    failed = await _validate(store, tmp_path, p.id, 2, token_counters=counter)
    assert failed.status is BatchStatus.FAILED
    [error] = failed.errors
    assert (error.code, error.line) == ("token_limit_exceeded", None)
    assert "Limit: 300 enqueued tokens" in error.message
    assert store.shards(failed.id) == []

    store.set_project_settings("alpha", ProjectSettings(token_limits={"m": 420}))  # no restart
    assert (await _validate(store, tmp_path, p.id, 3, token_counters=counter)).status is (
        BatchStatus.IN_PROGRESS
    )


# -- applied without a restart -------------------------------------------------------------


def test_merged_weights() -> None:
    assert merged_weights({"a": 2.0, "b": 3.0}, [("a", None), ("b", 0.5), ("c", 4.0)]) == {
        "a": 2.0,
        "b": 0.5,
        "c": 4.0,
    }


@pytest.mark.anyio
async def test_worker_rereads_weights_after_the_ttl(tmp_path: Path) -> None:
    store = MemoryStore()
    store.ensure_project("alpha")
    clock = Clock()
    settings = Settings(
        data_dir=tmp_path, project_weights={"alpha": 2.0, "beta": 3.0}, project_settings_ttl=2.0
    )
    worker = Worker(settings, store, open_blobs("memory://", tmp_path), {}, clock=clock)
    assert await worker.weights() == {"alpha": 2.0, "beta": 3.0}  # the settings' fallback
    store.set_project_settings("alpha", ProjectSettings(weight=5.0))
    clock.now += 1.0
    assert (await worker.weights())["alpha"] == 2.0  # cached for up to the TTL
    clock.now += 1.5
    assert await worker.weights() == {"alpha": 5.0, "beta": 3.0}  # the project's own wins


@pytest.mark.anyio
async def test_realtime_limits_per_project_and_changed_while_running() -> None:
    store = MemoryStore()
    p = store.ensure_project("alpha")
    q = store.ensure_project("beta")
    clock = Clock()
    limiter = RateLimiter(rpm=1000, clock=clock)
    limits = ProjectLimits(store, ttl=2.0, clock=clock)

    async def admit(project_id: str) -> bool:
        try:
            limiter.check(
                project_id, 1, **dict(zip(("rpm", "tpm"), await limits.of(project_id), strict=True))
            )
        except RateLimited:
            return False
        return True

    store.set_project_settings("alpha", ProjectSettings(realtime_rpm=2))
    assert [await admit(p.id) for _ in range(3)] == [True, True, False]
    assert all([await admit(q.id) for _ in range(10)])  # the default for the others

    store.set_project_settings("alpha", ProjectSettings(realtime_rpm=600))  # 10 a second
    assert not await admit(p.id)  # cached: still 2 a minute
    clock.now += 2.0  # past the TTL: read again; the bucket grows and refills at the new rate
    assert [await admit(p.id) for _ in range(10)] == [True] * 10
