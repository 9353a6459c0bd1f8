"""The simulator's building blocks: tokens, KV cache, roofline, metrics text, offline runs."""

from __future__ import annotations

import pytest

from backfill.sim import (
    PROFILES,
    OfflineRequest,
    Prompt,
    Simulator,
    chat_prompt,
    completion_prompt,
    get_profile,
    parse_metrics,
    sharegpt_like,
)
from backfill.sim.kvcache import KVCache
from backfill.sim.metrics import EngineMetrics, render
from backfill.sim.roofline import StepCost
from backfill.sim.tokens import output_text


class _Holder:
    def __init__(self) -> None:
        self.num_blocks = 0
        self.shared: list[int] = []


def test_chat_prompt_counts_words_plus_template_tokens() -> None:
    prompt = chat_prompt(
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello big world"}]},
        ]
    )
    assert prompt.num_tokens == 1 + (4 + 2) + (4 + 3) + 3
    assert completion_prompt("one two three").num_tokens == 4
    assert completion_prompt([5, 6, 7, 8]).num_tokens == 5


def test_shared_chat_prefix_shares_blocks() -> None:
    system = {"role": "system", "content": " ".join(f"w{i}" for i in range(100))}
    a = chat_prompt([system, {"role": "user", "content": "first question"}])
    b = chat_prompt([system, {"role": "user", "content": "another one entirely"}])
    shared = 0
    for x, y in zip(a.block_hashes, b.block_hashes, strict=False):
        if x != y:
            break
        shared += 1
    assert shared == (1 + 3 + 100) // 16  # full blocks inside BOS + header + system words
    assert a.block_hashes[shared:] != b.block_hashes[shared:]


def test_synthetic_prompts_share_only_the_declared_prefix() -> None:
    a = Prompt.synthetic(100, "a", shared_prefix=("sys", 40))
    b = Prompt.synthetic(100, "b", shared_prefix=("sys", 40))
    assert len(a.block_hashes) == 6
    assert a.block_hashes[:2] == b.block_hashes[:2]  # 2 full blocks inside 40 tokens
    assert a.block_hashes[2] != b.block_hashes[2]


def test_output_text_concatenates_to_the_whole() -> None:
    whole = output_text(0, 5000)
    assert len(whole.split()) == 5000
    pieces = "".join(output_text(a, b) for a, b in [(0, 1), (1, 17), (17, 40), (40, 5000)])
    assert pieces == whole
    assert output_text(3, 3) == ""


def test_kv_cache_counts_free_and_evictable_blocks() -> None:
    kv = KVCache(10, 16)
    a = _Holder()
    assert kv.allocate(a, 4)
    kv.commit(a, 111)
    kv.commit(a, 222)
    assert kv.num_free == 6 and kv.usage == pytest.approx(0.4)
    kv.release(a)
    assert kv.num_free == 10 and len(kv.evictable) == 2
    assert kv.match((111, 222, 333), 100) == (2, 2)
    b = _Holder()
    kv.acquire(b, (111, 222), 2)
    assert b.num_blocks == 2 and kv.num_free == 8
    assert not kv.allocate(b, 9)
    assert kv.allocate(b, 8)
    assert kv.num_free == 0
    kv.release(b)
    assert kv.num_free == 10


def test_match_always_leaves_the_last_token_to_compute() -> None:
    kv = KVCache(10, 16)
    holder = _Holder()
    kv.allocate(holder, 2)
    kv.commit(holder, 1)
    kv.commit(holder, 2)
    assert kv.match((1, 2), 32) == (1, 0)  # a fully cached 32-token prompt hits one block
    assert kv.match((1, 2), 33) == (2, 0)


def test_roofline_decode_is_memory_bound_and_prefill_compute_bound() -> None:
    profile = get_profile("llama-3.1-8b-h100")
    cost = StepCost.of(profile)
    decode_compute = cost.per_token_compute * 8
    decode_memory = cost.weights_read + cost.per_kv_token_read * 8 * 1000
    assert decode_memory > decode_compute
    prefill_compute = cost.per_token_compute * 4096 + cost.per_pair_compute * 4096 * 2048
    assert prefill_compute > cost.weights_read + cost.per_kv_token_read * 4096
    # one H100 reads 16 GB of weights in ~6.4 ms at mbu 0.75
    assert 5e-3 < cost.weights_read < 8e-3


def test_profiles_have_plausible_kv_capacity() -> None:
    p8 = PROFILES["llama-3.1-8b-h100"]
    assert p8.kv_bytes_per_token == 128 * 1024
    assert 350_000 < p8.kv_capacity_tokens < 550_000
    p70 = PROFILES["llama-3.1-70b-4xh100"]
    assert p70.kv_bytes_per_token == 320 * 1024
    assert p70.tp == 4 and p70.kv_capacity_tokens > 300_000
    with pytest.raises(ValueError, match="unknown sim profile"):
        get_profile("nope")


def test_metrics_render_and_parse_round_trip() -> None:
    metrics = EngineMetrics()
    metrics.prompt_tokens = 12
    metrics.ttft.observe(0.05)
    metrics.ttft.observe(0.3, 2)
    text = render(
        metrics, model='m"1', running=3, waiting=4, kv_usage=0.25, sim_time=9.0, lag_s=0.0
    )
    values = parse_metrics(text)
    assert values["vllm:num_requests_running"] == 3
    assert values["vllm:num_requests_waiting"] == 4
    assert values["vllm:kv_cache_usage_perc"] == 0.25
    assert values["vllm:prompt_tokens_total"] == 12
    assert values["vllm:time_to_first_token_seconds_count"] == 3
    assert values['vllm:time_to_first_token_seconds_bucket{le="0.06"}'] == 1
    assert values['vllm:time_to_first_token_seconds_bucket{le="0.5"}'] == 3
    assert values["vllm:time_to_first_token_seconds_sum"] == pytest.approx(0.65)
    assert "# TYPE vllm:num_preemptions_total counter" in text


def test_sharegpt_like_has_the_requested_means() -> None:
    requests = sharegpt_like(2000, seed=3)
    lengths = [r.prompt if isinstance(r.prompt, int) else r.prompt.num_tokens for r in requests]
    prompt_mean = sum(lengths) / 2000
    output_mean = sum(r.max_tokens for r in requests) / 2000
    assert 220 < prompt_mean < 240 and 180 < output_mean < 200
    assert sharegpt_like(5, seed=1) == sharegpt_like(5, seed=1)


def test_run_offline_counts_every_token_and_arrivals_gap() -> None:
    requests = [OfflineRequest(prompt=50, max_tokens=7, arrival=float(i)) for i in range(5)]
    stats = Simulator("llama-3.1-8b-h100").run_offline(requests)
    assert stats.requests == 5 and stats.output_tokens == 35 and stats.prompt_tokens == 250
    assert stats.duration_s > 4.0  # the last request arrives at t=4
    assert stats.queue.max == 0.0  # an idle engine admits at once
    assert stats.ttft.count == 5 and stats.tpot.count == 5


def test_offline_throughput_of_the_8b_profile_is_in_the_published_band() -> None:
    requests = sharegpt_like(5000, seed=0, max_prompt=1024, max_output=1024)
    stats = Simulator("llama-3.1-8b-h100").run_offline(requests)
    assert 21_000 < stats.total_tokens_per_s < 25_000
    assert stats.requests == 5000
