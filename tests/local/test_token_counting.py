"""In-process engines count a request's prompt tokens for the quotas exactly as they count
them in `usage` when they run it: the tiny Llama (chat template, completion prompts) and the
packaged MiniLM (embedding inputs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from backfill.engines.embeddings import EmbeddingsEngine
from backfill.engines.transformers_engine import TransformersEngine
from backfill.settings import ModelConfig

CHAT = "/v1/chat/completions"


async def prompt_tokens(engine: Any, endpoint: str, body: dict[str, Any]) -> int:
    reply = await engine.send(endpoint, dict(body))
    assert reply.status == 200, reply.body
    return int(orjson.loads(reply.body)["usage"]["prompt_tokens"])


@pytest.mark.anyio
async def test_transformers_counts_as_it_runs(tiny_model_dir: Path) -> None:
    engine = TransformersEngine(
        ModelConfig(name="tiny", kind="transformers", path=str(tiny_model_dir))
    )
    body: dict[str, Any] = {"model": "tiny", "max_tokens": 2}
    assert engine.count_tokens(CHAT, {**body, "messages": []}) is None  # not started
    await engine.start()
    try:
        chat = {
            **body,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "How many tokens is this sentence, really?"},
            ],
        }
        counted = engine.count_tokens(CHAT, chat)
        assert counted is not None and counted > 10
        assert counted == await prompt_tokens(engine, CHAT, chat)
        completion = {**body, "prompt": ["one two three", "four five"]}
        counted = engine.count_tokens("/v1/completions", completion)
        assert counted == await prompt_tokens(engine, "/v1/completions", completion)
        assert engine.count_tokens("/v1/responses", {**body, "input": "hi"}) is None
    finally:
        await engine.close()


@pytest.mark.anyio
async def test_embeddings_count_as_they_run(minilm_dir: Path) -> None:
    engine = EmbeddingsEngine(ModelConfig(name="minilm", kind="embeddings", path=str(minilm_dir)))
    await engine.start()
    try:
        body = {"model": "minilm", "input": ["a short one", "and a somewhat longer sentence"]}
        counted = engine.count_tokens("/v1/embeddings", body)
        assert counted is not None and counted > 6
        assert counted == await prompt_tokens(engine, "/v1/embeddings", body)
        assert engine.count_tokens("/v1/embeddings", {"model": "minilm", "input": 3}) is None
    finally:
        await engine.close()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
