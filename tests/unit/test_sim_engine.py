"""The simulated engine's scheduler: budgets, chunked prefill, KV preemption, priority, prefix
cache, exact outputs. Pure: no sockets, no sleeping (the engine's clock is simulated)."""

from __future__ import annotations

from backfill.sim import Engine, Prompt, SimRequest, StepResult, get_profile
from backfill.sim.profiles import Profile


def _profile(**overrides: object) -> Profile:
    base: dict[str, object] = {"max_num_seqs": 8, "max_num_batched_tokens": 512}
    base.update(overrides)
    return get_profile("llama-3.1-8b-h100", **base)


def _request(
    name: str,
    prompt_len: int,
    max_tokens: int,
    *,
    priority: int = 0,
    arrival: float = 0.0,
    prefix: tuple[str, int] | None = None,
) -> SimRequest:
    prompt = Prompt.synthetic(prompt_len, name, shared_prefix=prefix)
    return SimRequest(name, prompt, max_tokens, priority=priority, arrival=arrival)


def _run(engine: Engine, limit: int = 100_000) -> list[StepResult]:
    results = []
    for _ in range(limit):
        result = engine.step()
        if result is None:
            break
        results.append(result)
    assert not engine.has_work()
    return results


def test_token_budget_respected_each_step_and_filled_when_work_allows() -> None:
    engine = Engine(_profile(max_num_batched_tokens=256))
    requests = [_request(f"r{i}", 300, 4) for i in range(6)]
    for request in requests:
        engine.add(request)
    results = _run(engine)
    assert all(r.num_tokens <= 256 for r in results)
    assert results[0].num_tokens == 256  # enough prefill work to fill the first step
    assert all(r.num_output == 4 for r in requests)


def test_chunked_prefill_splits_a_long_prompt() -> None:
    engine = Engine(_profile(max_num_batched_tokens=512))
    request = _request("long", 1200, 3)
    engine.add(request)
    results = _run(engine)
    # 1200 prompt tokens in chunks of 512, 512, 176 (first token), then 2 decode steps
    assert [r.num_tokens for r in results] == [512, 512, 176, 1, 1]
    assert [len(r.emitted) for r in results] == [0, 0, 1, 1, 1]
    assert request.num_output == 3


def test_long_prefill_threshold_caps_each_request_per_step() -> None:
    # vLLM's --long-prefill-token-threshold: no request prefills more than it in one step,
    # so two long prompts share the budget instead of the first taking all of it
    engine = Engine(_profile(max_num_batched_tokens=512, long_prefill_token_threshold=200))
    first, second = _request("first", 450, 2), _request("second", 300, 2)
    engine.add(first)
    engine.add(second)
    results = _run(engine)
    # 200 + 200; 200 + the last 100 of `second` (its first token); the last 50 of `first`
    # (its first token) + a decode; a decode
    assert [r.num_tokens for r in results] == [400, 300, 51, 1]
    assert [len(r.emitted) for r in results] == [0, 1, 2, 1]
    assert first.num_output == second.num_output == 2


def test_long_prefill_threshold_zero_leaves_chunks_to_the_budget() -> None:
    engine = Engine(_profile(max_num_batched_tokens=512, long_prefill_token_threshold=0))
    request = _request("long", 700, 1)
    engine.add(request)
    assert [r.num_tokens for r in _run(engine)] == [512, 188]


def test_decodes_run_before_a_new_prefill_chunk() -> None:
    engine = Engine(_profile(max_num_batched_tokens=64))
    first = _request("first", 32, 10)
    engine.add(first)
    engine.step()  # first prefilled, decoding from now on
    second = _request("second", 500, 2)
    engine.add(second)
    result = engine.step()
    assert result is not None
    assert first in result.emitted  # the decode was scheduled...
    assert second.num_computed == 63  # ...and the prefill took the rest of the budget


def test_max_num_seqs_respected() -> None:
    engine = Engine(_profile(max_num_seqs=3))
    requests = [_request(f"r{i}", 20, 5) for i in range(10)]
    for request in requests:
        engine.add(request)
    peak = 0
    while (result := engine.step()) is not None:
        assert result.num_seqs <= 3
        peak = max(peak, engine.num_running)
    assert peak == 3
    assert all(r.num_output == 5 for r in requests)


def test_kv_exhaustion_preempts_and_the_preempted_request_still_completes_exactly() -> None:
    engine = Engine(_profile(num_gpu_blocks_override=30))  # 480 tokens of KV
    requests = [_request(f"r{i}", 100, 90, arrival=i * 1e-6) for i in range(4)]
    for request in requests:
        engine.add(request)
    results = _run(engine)
    assert engine.metrics.preemptions > 0
    assert sum(r.preempted for r in results) == engine.metrics.preemptions
    assert any(r.preemptions for r in requests)
    assert [r.num_output for r in requests] == [90] * 4
    assert engine.metrics.generation_tokens == 360
    assert engine.kv.num_free == 30  # everything released


def test_preemption_victim_is_the_latest_arrival_among_equal_priorities() -> None:
    engine = Engine(_profile(num_gpu_blocks_override=20))
    early = _request("early", 120, 200, arrival=0.0)
    late = _request("late", 120, 200, arrival=0.001)
    engine.now = 0.001
    engine.add(early)
    engine.add(late)
    while engine.metrics.preemptions == 0:
        assert engine.step() is not None
    assert late.preemptions == 1 and early.preemptions == 0


def test_low_priority_running_request_is_preempted_first() -> None:
    engine = Engine(_profile(num_gpu_blocks_override=20))
    background = _request("background", 120, 200, priority=10, arrival=0.0)
    urgent = _request("urgent", 120, 200, priority=0, arrival=0.001)
    engine.now = 0.001
    engine.add(background)
    engine.add(urgent)
    while engine.metrics.preemptions == 0:
        assert engine.step() is not None
    assert background.preemptions == 1 and urgent.preemptions == 0
    _run(engine)
    assert background.num_output == urgent.num_output == 200
    assert urgent.finish_time < background.finish_time


def test_high_priority_arrival_is_scheduled_before_older_low_priority_waiting() -> None:
    engine = Engine(_profile(max_num_seqs=1))
    busy = _request("busy", 16, 3)
    engine.add(busy)
    engine.step()
    old = _request("old", 16, 3, priority=0, arrival=engine.now)
    engine.add(old)
    engine.step()
    new = _request("new", 16, 3, priority=-5, arrival=engine.now)
    engine.add(new)
    _run(engine)
    assert new.first_scheduled < old.first_scheduled
    assert busy.first_scheduled < new.first_scheduled  # running requests are not displaced


def test_prefix_cache_hits_skip_prefill_and_show_in_cached_tokens() -> None:
    engine = Engine(_profile())
    first = _request("a", 300, 2, prefix=("system", 200))
    engine.add(first)
    _run(engine)
    prefill_before = engine.metrics.busy_s
    second = _request("b", 300, 2, prefix=("system", 200))
    engine.add(second)
    result = engine.step()
    assert result is not None
    assert second.cached_tokens == 192  # 12 full blocks of the 200-token shared prefix
    assert result.num_tokens == 300 - 192  # only the rest is computed
    assert first.cached_tokens == 0
    assert engine.metrics.prefix_hits == 192
    assert engine.metrics.prefix_queries == 600
    assert prefill_before > 0


def test_prefix_cache_reports_queries_and_hits_in_tokens() -> None:
    engine = Engine(_profile())
    for name in ("a", "b", "c"):
        engine.add(_request(name, 64, 1, prefix=("shared", 64)))
        _run(engine)
    # every lookup queries the whole prompt; a fully cached prompt still computes its last token
    assert engine.metrics.prefix_queries == 3 * 64
    assert engine.metrics.prefix_hits == 2 * 48


def test_unreferenced_cached_blocks_are_evicted_lru() -> None:
    engine = Engine(_profile(num_gpu_blocks_override=10))
    engine.add(_request("a", 64, 1, prefix=("A", 64)))
    _run(engine)
    engine.add(_request("b", 120, 1))  # needs 8 blocks: 6 free + evicts 2 cached blocks of A
    _run(engine)
    again = _request("a2", 64, 1, prefix=("A", 64))
    engine.add(again)
    _run(engine)
    assert engine.kv.evictions >= 2
    assert again.cached_tokens == 32  # A's tail blocks went first, its head still hits


def test_step_time_grows_with_batch_size_in_decode() -> None:
    def decode_step(batch: int) -> float:
        engine = Engine(_profile(max_num_seqs=512, max_num_batched_tokens=65536))
        for i in range(batch):
            engine.add(_request(f"r{i}", 200, 10))
        engine.step()  # all prefills
        result = engine.step()  # one token each
        assert result is not None and result.num_tokens == batch
        return result.duration

    times = [decode_step(b) for b in (1, 16, 64, 256)]
    assert times == sorted(times) and times[0] < times[-1]


def test_step_time_grows_with_prefill_tokens() -> None:
    def prefill_step(tokens: int) -> float:
        engine = Engine(_profile(max_num_batched_tokens=8192))
        engine.add(_request("p", tokens, 1))
        result = engine.step()
        assert result is not None and result.num_tokens == tokens
        return result.duration

    times = [prefill_step(n) for n in (16, 512, 2048, 8192)]
    assert times == sorted(times) and times[0] < times[-1]


def test_outputs_and_usage_are_exact() -> None:
    engine = Engine(_profile())
    requests = [_request(f"r{i}", 10 + 37 * i, 1 + 3 * i) for i in range(12)]
    for request in requests:
        engine.add(request)
    results = _run(engine)
    assert [r.num_output for r in requests] == [1 + 3 * i for i in range(12)]
    assert all(r.finished and r.cached_tokens == 0 for r in requests)
    assert engine.metrics.generation_tokens == sum(1 + 3 * i for i in range(12))
    assert engine.metrics.prompt_tokens == sum(10 + 37 * i for i in range(12))
    assert sum(len(r.finished) for r in results) == 12
    for request in requests:
        timings = request.timings()
        assert 0 <= timings["queue_s"] <= timings["ttft_s"] <= timings["e2e_s"]


def test_abort_releases_blocks_and_drops_the_request() -> None:
    engine = Engine(_profile())
    keep = _request("keep", 100, 5)
    drop = _request("drop", 100, 50)
    waiting = _request("waiting", 100, 5)
    engine.add(keep)
    engine.add(drop)
    engine.step()
    engine.add(waiting)
    engine.abort(drop)
    engine.abort(waiting)
    _run(engine)
    assert keep.num_output == 5 and drop.num_output == 1 and waiting.num_output == 0
    assert engine.metrics.requests_aborted == 2
    assert engine.kv.num_free == engine.kv.num_blocks


def test_requests_longer_than_the_context_are_refused() -> None:
    engine = Engine(_profile(num_gpu_blocks_override=10))
    assert engine.max_len == 160
    try:
        engine.add(_request("big", 150, 20))
    except ValueError as exc:
        assert "170" in str(exc)
    else:
        raise AssertionError("expected ValueError")
