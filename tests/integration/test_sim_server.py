"""`backfill sim` over real HTTP: the official openai SDK, SSE streaming, /metrics, errors.

The simulator runs as a subprocess at a high speedup. No timing assertions: counts, orders and
structure only (simulated latencies come back in the `sim` extension fields).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator

import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from backfill.sim import SimProcess, start_sim

MODEL = "sim-8b"


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    with start_sim("llama-3.1-8b-h100", speedup=50, model_name=MODEL) as proc:
        yield proc


@pytest.fixture()
def client(sim: SimProcess) -> OpenAI:
    return OpenAI(base_url=sim.url, api_key="unused", max_retries=0, timeout=30)


def test_models_lists_the_served_name(client: OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_chat_completion_has_exact_usage_and_sim_timings(client: OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "one two three four"}],
        max_tokens=7,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.content is not None and len(choice.message.content.split()) == 7
    assert response.usage is not None
    assert response.usage.prompt_tokens == 1 + 4 + 4 + 3
    assert response.usage.completion_tokens == 7
    assert response.usage.total_tokens == 19
    sim = (response.model_extra or {})["sim"]
    assert 0 <= sim["queue_s"] <= sim["ttft_s"] <= sim["e2e_s"]
    assert sim["tpot_s"] > 0 and sim["preemptions"] == 0


def test_max_completion_tokens_and_default_length(client: OpenAI) -> None:
    messages = [{"role": "user", "content": "hi"}]
    explicit = client.chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        max_completion_tokens=3,
    )
    default = client.chat.completions.create(model=MODEL, messages=messages)  # type: ignore[arg-type]
    assert explicit.usage is not None and explicit.usage.completion_tokens == 3
    assert default.usage is not None and default.usage.completion_tokens == 16


def test_streamed_chat_parses_with_the_sdk(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "stream me some text please"}],
        max_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
    )
    text = ""
    roles = []
    finish = []
    usage = None
    sims = []
    chunks = 0
    for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.model_extra and "sim" in chunk.model_extra:
            sims.append(chunk.model_extra["sim"])
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.delta.role)
            text += choice.delta.content or ""
            if choice.finish_reason:
                finish.append(choice.finish_reason)
    assert roles == ["assistant"]
    assert len(text.split()) == 40
    assert finish == ["length"]
    assert usage is not None and usage.completion_tokens == 40
    assert sims and sims[-1]["e2e_s"] >= sims[-1]["ttft_s"]
    assert 3 <= chunks <= 43  # tokens are coalesced, never more than one event per token


def test_streamed_text_completion(client: OpenAI) -> None:
    stream = client.completions.create(model=MODEL, prompt="a b c d", max_tokens=12, stream=True)
    pieces = [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert len("".join(pieces).split()) == 12


def test_text_completion_counts_prompt_words(client: OpenAI) -> None:
    response = client.completions.create(model=MODEL, prompt="a b c d", max_tokens=2)
    assert response.usage is not None
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (5, 2)
    assert response.choices[0].finish_reason == "length"


def test_too_long_prompt_is_400_context_length_exceeded(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        # one word per token: as long as 131,072 token ids, without the SDK walking a long list
        client.completions.create(model=MODEL, prompt="x " * 131072, max_tokens=1)
    assert info.value.status_code == 400
    body = info.value.body
    assert isinstance(body, dict) and body["code"] == "context_length_exceeded"


def test_unknown_model_is_404(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="other", messages=[{"role": "user", "content": "x"}], max_tokens=1
        )


def test_bad_priority_is_400(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            max_tokens=1,
            extra_body={"priority": "high"},
        )


def test_shared_prefix_reports_cached_tokens(client: OpenAI) -> None:
    system = {"role": "system", "content": " ".join(f"rule{i}" for i in range(200))}
    for question in ("first question", "second question"):
        response = client.chat.completions.create(
            model=MODEL,
            messages=[system, {"role": "user", "content": question}],  # type: ignore[list-item]
            max_tokens=2,
            extra_body={"priority": 1},
        )
    assert response.usage is not None and response.usage.prompt_tokens_details is not None
    # BOS + system header + 200 words + end of turn + user header = 208 shared tokens: 13 blocks
    assert response.usage.prompt_tokens_details.cached_tokens == 208


def test_many_concurrent_streams_all_complete(sim: SimProcess) -> None:
    async def main() -> list[int]:
        client = AsyncOpenAI(base_url=sim.url, api_key="unused", max_retries=0, timeout=60)

        async def one(i: int) -> int:
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": f"request {i} " + "word " * (i % 50)}],
                max_tokens=20 + i % 30,
                stream=True,
            )
            count = 0
            async for chunk in stream:
                for choice in chunk.choices:
                    count += len((choice.delta.content or "").split())
            return count

        try:
            return await asyncio.gather(*(one(i) for i in range(120)))
        finally:
            await client.close()

    counts = asyncio.run(main())
    assert counts == [20 + i % 30 for i in range(120)]


def test_metrics_use_vllm_names_with_plausible_values(sim: SimProcess) -> None:
    text = sim.metrics_text()
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:num_preemptions_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
    ):
        assert name in text
    assert f'model_name="{MODEL}"' in text
    values = sim.metrics()
    assert values["vllm:generation_tokens_total"] > 0
    assert values["vllm:prompt_tokens_total"] > 0
    assert 0.0 <= values["vllm:kv_cache_usage_perc"] <= 1.0
    assert values["vllm:prefix_cache_hits_total"] <= values["vllm:prefix_cache_queries_total"]
    assert values["vllm:time_to_first_token_seconds_count"] >= 1
    stats = sim.stats()
    assert stats["profile"] == "llama-3.1-8b-h100" and stats["steps"] > 0


def test_health_and_unknown_paths(sim: SimProcess) -> None:
    with urllib.request.urlopen(sim.base + "/health", timeout=5) as resp:
        assert resp.status == 200
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(sim.base + "/nope", timeout=5)
    assert info.value.code == 404
    assert json.loads(info.value.read())["error"]["type"] == "invalid_request_error"


def test_cli_subcommand_help_lists_the_profiles() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "backfill.cli.main", "sim", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "llama-3.1-8b-h100" in out.stdout and "--speedup" in out.stdout


def test_kv_pressure_preempts_over_http_and_outputs_stay_exact() -> None:
    # 64 blocks = 1024 tokens of KV; 8 concurrent requests of ~110 + 100 tokens need ~1700
    with start_sim("llama-3.1-8b-h100", speedup=5, num_gpu_blocks=64, model_name=MODEL) as sim:

        async def main() -> list[tuple[int, int]]:
            client = AsyncOpenAI(base_url=sim.url, api_key="unused", max_retries=0, timeout=60)

            async def one(i: int) -> tuple[int, int]:
                response = await client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": f"q{i} " + "word " * 100}],
                    max_tokens=100,
                    extra_body={"priority": i % 2},
                )
                assert response.usage is not None
                sim_fields = (response.model_extra or {})["sim"]
                return response.usage.completion_tokens, sim_fields["preemptions"]

            try:
                return await asyncio.gather(*(one(i) for i in range(8)))
            finally:
                await client.close()

        results = asyncio.run(main())
        values = sim.metrics()
    assert [tokens for tokens, _ in results] == [100] * 8
    assert values["vllm:num_preemptions_total"] >= 1
    assert sum(p for _, p in results) == values["vllm:num_preemptions_total"]
    # victims are chosen among the low-priority (odd) requests first
    assert sum(p for i, (_, p) in enumerate(results) if i % 2 == 0) <= sum(
        p for i, (_, p) in enumerate(results) if i % 2 == 1
    )
