"""Issue 13, part 2: the governor reads its load from real engines' `/metrics` pages.

Pages in the shapes vLLM 0.32 (two data-parallel engines, every series labelled `engine` and
`model_name`), an older vLLM, SGLang and llama.cpp (`llama-server --metrics`) serve, each read
through `OpenAIEngine.parse_load` (the first page whole, later ones through `only=`) into the
`EngineLoad` the governor hands the policy; and backfill's own `/metrics` showing what each
governor last read.

`test_the_governor_is_not_blind_on_vllm_0_32` fails on the parser before issue 13 (checked
against HEAD's `metrics.py`/`openai.py`/`governor.py`): only `model_name` was folded, so every
key carried `{engine="0"}`, `"vllm:num_requests_running" not in metrics`, `load()` returned
None and the governor ran on the gateway's latencies alone. Its imports are HEAD's too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from backfill.dispatch.dispatcher import Dispatcher
from backfill.dispatch.governor import Governor
from backfill.dispatch.policy import GovernorPolicy, PolicyConfig
from backfill.dispatch.signals import EngineLoad, RealtimeStats
from backfill.engines.base import EngineReply
from backfill.engines.openai import OpenAIEngine
from backfill.metrics import Exposition, by_model, parse
from backfill.service import Service
from backfill.settings import ModelConfig, Settings

M = "meta-llama/Llama-3.1-8B-Instruct"


def vllm_0_32(step: int = 0) -> str:
    """Two data-parallel engines behind one vLLM 0.32 server (`--data-parallel-size 2`)."""
    lines = []
    for name, help_text, values in (
        ("vllm:num_requests_running", "Number of requests in model execution batches.", (3, 5)),
        ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", (1, 0)),
        ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", (0.25, 0.75)),
    ):
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        for engine, value in enumerate(values):
            lines.append(f'{name}{{engine="{engine}",model_name="{M}"}} {float(value)}')
    lines += [
        "# HELP vllm:request_success_total Count of successfully processed requests.",
        "# TYPE vllm:request_success_total counter",
        f'vllm:request_success_total{{engine="0",finished_reason="stop",model_name="{M}"}} 7.0',
        f'vllm:request_success_total{{engine="1",finished_reason="stop",model_name="{M}"}} 9.0',
        "# HELP vllm:inter_token_latency_seconds Histogram of inter-token latency in seconds.",
        "# TYPE vllm:inter_token_latency_seconds histogram",
    ]
    for engine, count, total in (("0", 100 + 10 * step, 2.0 + 0.3 * step),
                                 ("1", 200 + 30 * step, 4.0 + 0.9 * step)):  # fmt: skip
        labels = f'engine="{engine}",model_name="{M}"'
        lines += [
            f'vllm:inter_token_latency_seconds_bucket{{{labels},le="0.01"}} {count / 2}',
            f'vllm:inter_token_latency_seconds_bucket{{{labels},le="+Inf"}} {float(count)}',
            f"vllm:inter_token_latency_seconds_count{{{labels}}} {float(count)}",
            f"vllm:inter_token_latency_seconds_sum{{{labels}}} {total}",
        ]
    return "\n".join(lines) + "\n"


def vllm_older(step: int = 0) -> str:
    """vLLM before 0.10: `gpu_cache_usage_perc`, `time_per_output_token_seconds`, no engine."""
    labels = f'model_name="{M}"'
    return f"""\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{{labels}}} 4.0
# HELP vllm:num_requests_swapped Number of requests swapped to CPU.
# TYPE vllm:num_requests_swapped gauge
vllm:num_requests_swapped{{{labels}}} 0.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{{labels}}} 2.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{{{labels}}} 0.5
# HELP vllm:time_per_output_token_seconds Histogram of time per output token in seconds.
# TYPE vllm:time_per_output_token_seconds histogram
vllm:time_per_output_token_seconds_bucket{{{labels},le="0.01"}} 10.0
vllm:time_per_output_token_seconds_bucket{{{labels},le="+Inf"}} {50.0 + 40 * step}
vllm:time_per_output_token_seconds_count{{{labels}}} {50.0 + 40 * step}
vllm:time_per_output_token_seconds_sum{{{labels}}} {1.0 + 1.2 * step}
"""


def sglang(step: int = 0) -> str:
    """SGLang with data-parallel attention: one series per `dp_rank`."""
    out = []
    for name, values in (
        ("sglang:num_running_reqs", (6.0, 2.0)),
        ("sglang:num_queue_reqs", (3.0, 1.0)),
        ("sglang:token_usage", (0.2, 0.4)),
        ("sglang:gen_throughput", (900.0, 800.0)),
    ):
        out += [f"# HELP {name} {name}.", f"# TYPE {name} gauge"]
        for rank, value in enumerate(values):
            out.append(f'{name}{{dp_rank="{rank}",model_name="{M}",tp_rank="0"}} {value}')
    out += [
        "# HELP sglang:num_running_reqs_offline_batch Low-priority offline batch requests.",
        "# TYPE sglang:num_running_reqs_offline_batch gauge",
        f'sglang:num_running_reqs_offline_batch{{model_name="{M}"}} 1.0',
        "# HELP sglang:time_per_output_token_seconds Histogram of time per output token.",
        "# TYPE sglang:time_per_output_token_seconds histogram",
        f'sglang:time_per_output_token_seconds_sum{{model_name="{M}"}} {0.5 + 0.06 * step}',
        f'sglang:time_per_output_token_seconds_bucket{{le="+Inf",model_name="{M}"}} '
        f"{20.0 + 3 * step}",
        f'sglang:time_per_output_token_seconds_count{{model_name="{M}"}} {20.0 + 3 * step}',
    ]
    return "\n".join(out) + "\n"


def llamacpp(step: int = 0, kv: bool = True) -> str:
    """`llama-server --metrics`: no labels; TPOT from the generation counters."""
    page = f"""\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 1000
# HELP llamacpp:prompt_seconds_total Prompt process time
# TYPE llamacpp:prompt_seconds_total counter
llamacpp:prompt_seconds_total 2.5
# HELP llamacpp:tokens_predicted_total Number of generation tokens processed.
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total {500 + 100 * step}
# HELP llamacpp:tokens_predicted_seconds_total Predict process time
# TYPE llamacpp:tokens_predicted_seconds_total counter
llamacpp:tokens_predicted_seconds_total {10.0 + 2.5 * step}
# HELP llamacpp:n_decode_total Total number of llama_decode() calls
# TYPE llamacpp:n_decode_total counter
llamacpp:n_decode_total 600
# HELP llamacpp:predicted_tokens_seconds Average generation throughput in tokens/s.
# TYPE llamacpp:predicted_tokens_seconds gauge
llamacpp:predicted_tokens_seconds 50
# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 4
# HELP llamacpp:requests_deferred Number of requests deferred.
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 2
"""
    if kv:
        page += """\
# HELP llamacpp:kv_cache_usage_ratio KV-cache usage. 1 means 100 percent usage.
# TYPE llamacpp:kv_cache_usage_ratio gauge
llamacpp:kv_cache_usage_ratio 0.375
"""
    return page


class ScrapedEngine:
    """An engine whose `load_metrics` reads the next of `pages` as `OpenAIEngine` does."""

    model = "m"
    endpoints = frozenset({"/v1/chat/completions"})

    def __init__(self, pages: list[str | None]) -> None:
        self.pages = pages
        self.upstream = OpenAIEngine(ModelConfig(name="m", url="http://127.0.0.1:9/v1"))

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def send(self, endpoint: str, body: object, *, timeout: float | None = None) -> object:
        return EngineReply(200, b"{}")

    async def load_metrics(self) -> dict[str, float] | None:
        page = self.pages.pop(0)
        return None if page is None else self.upstream.parse_load(page)


def governor(pages: list[str | None], name: str = "m") -> Governor:
    fake = ScrapedEngine(pages)
    fake.model = name
    dispatcher = Dispatcher.from_config(fake, ModelConfig(name=name, url="x"))  # type: ignore[arg-type]
    return Governor(dispatcher, RealtimeStats(), GovernorPolicy(PolicyConfig(ceiling=8)))


def loads(pages: list[str | None]) -> list[EngineLoad | None]:
    gov = governor(pages)
    count = len(pages)
    return asyncio.run(_loads(gov, count))


async def _loads(gov: Governor, count: int) -> list[EngineLoad | None]:
    return [await gov.load() for _ in range(count)]


def test_the_governor_is_not_blind_on_vllm_0_32() -> None:
    first, second, third = loads([vllm_0_32(0), vllm_0_32(1), vllm_0_32(1)])
    assert first is not None, "no engine load read from a vLLM 0.32 page: the governor is blind"
    assert (first.running, first.waiting) == (8.0, 1.0)  # engines summed
    assert first.kv_usage == pytest.approx(0.5)  # (0.25 + 0.75) / 2
    assert first.tpot is None  # no previous scrape
    assert second is not None and second.tpot == pytest.approx((0.3 + 0.9) / (10 + 30))
    assert third is not None and third.tpot is None  # no token since


@pytest.mark.parametrize(
    ("page", "running", "waiting", "kv", "tpot"),
    [
        (vllm_0_32, 8.0, 1.0, 0.5, 1.2 / 40),
        (vllm_older, 4.0, 2.0, 0.5, 1.2 / 40),
        (sglang, 8.0, 4.0, 0.3, 0.06 / 3),
        (llamacpp, 4.0, 2.0, 0.375, 2.5 / 100),
    ],
    ids=["vllm-0.32-two-engines", "vllm-older", "sglang-dp2", "llamacpp"],
)
def test_each_engine_family_gives_the_right_load(
    page: Callable[[int], str], running: float, waiting: float, kv: float, tpot: float
) -> None:
    # first page parsed whole, the next two through `only=` (the cheap path)
    first, second, _ = loads([page(0), page(1), page(1)])
    assert first is not None and second is not None
    assert (second.running, second.waiting) == (running, waiting)
    assert second.kv_usage == pytest.approx(kv)
    assert second.tpot == pytest.approx(tpot)
    assert first == EngineLoad(running, waiting, pytest.approx(kv), None)  # type: ignore[arg-type]


def test_the_cheap_path_reads_the_same_as_a_whole_parse_for_every_family() -> None:
    for page in (vllm_0_32(), vllm_older(), sglang(), llamacpp()):
        upstream = OpenAIEngine(ModelConfig(name="m", url="http://127.0.0.1:9/v1"))
        whole = upstream.parse_load(page)
        assert whole and not any("{" in key for key in whole)  # every label folded
        assert upstream.parse_load(page) == whole


def test_the_generic_parse_folds_placement_labels_and_keeps_dimensions() -> None:
    values = parse(vllm_0_32())
    assert values["vllm:num_requests_running"] == 8.0
    assert values["vllm:kv_cache_usage_perc"] == pytest.approx(0.5)
    assert values['vllm:request_success_total{finished_reason="stop"}'] == 16.0
    assert values['vllm:inter_token_latency_seconds_bucket{le="+Inf"}'] == 300.0
    sg = parse(sglang())
    assert sg["sglang:num_running_reqs"] == 8.0 and sg["sglang:token_usage"] == pytest.approx(0.3)


def test_a_page_without_a_known_running_count_leaves_the_governor_on_the_gateway() -> None:
    assert loads(["# TYPE other_gauge gauge\nother_gauge 3\n", None]) == [None, None]


def test_metrics_show_what_each_governor_last_read(tmp_path: Path) -> None:
    models = [ModelConfig(name=n, url="http://127.0.0.1:9/v1") for n in ("a", "b", "c")]
    service = Service(Settings(data_dir=tmp_path, models=models))
    try:
        service.governors["a"] = governor([vllm_0_32()], "a")
        service.governors["b"] = governor([None], "b")  # serves no metrics
        service.governors["c"] = governor([llamacpp(kv=False)], "c")  # current llama.cpp: no KV
        before = parse(
            Exposition(lambda: by_model(service.metric_families())).render().decode(),
            drop_labels=(),
        )

        async def tick() -> None:
            for gov in service.governors.values():
                await gov.tick()

        asyncio.run(tick())
        text = Exposition(lambda: by_model(service.metric_families())).render().decode()
    finally:
        service.close()
    assert before['backfill_governor_engine_metrics{model="a"}'] == 0.0  # nothing read yet
    assert not any(key.startswith("backfill_engine_") for key in before)
    values = parse(text, drop_labels=())
    assert values['backfill_governor_engine_metrics{model="a"}'] == 1.0
    assert values['backfill_governor_engine_metrics{model="b"}'] == 0.0
    assert values['backfill_governor_engine_metrics{model="c"}'] == 1.0
    assert values['backfill_engine_requests_running{model="a"}'] == 8.0
    assert values['backfill_engine_requests_waiting{model="a"}'] == 1.0
    assert values['backfill_engine_kv_cache_usage{model="a"}'] == pytest.approx(0.5)
    assert values['backfill_engine_requests_running{model="c"}'] == 4.0
    assert 'backfill_engine_kv_cache_usage{model="c"}' not in values  # not served: absent
    assert not any('model="b"' in key for key in values if key.startswith("backfill_engine_"))
    assert "# TYPE backfill_engine_kv_cache_usage gauge" in text


def test_the_governor_reads_the_simulators_vllm_0_32_page() -> None:
    # the simulator labels as vLLM 0.32 does, so a governor blind to `engine` fails here too
    from backfill.sim.metrics import EngineMetrics, render

    metrics = EngineMetrics()
    metrics.tpot.observe(0.02, 10)
    page = render(metrics, model=M, running=5, waiting=2, kv_usage=0.5, sim_time=1.0)
    assert 'engine="0"' in page and "vllm:inter_token_latency_seconds_sum" in page
    metrics.tpot.observe(0.04, 10)
    later = render(metrics, model=M, running=6, waiting=1, kv_usage=0.6, sim_time=2.0)
    first, second = loads([page, later])
    assert first == EngineLoad(5.0, 2.0, 0.5, None)
    assert second is not None and second.tpot == pytest.approx(0.04)
