"""Prometheus text both ways (`backfill.metrics`): parsing an upstream's page the way the governor
reads it, and backfill's own `/metrics` read back with prometheus_client's parser."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import httpx2 as httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from backfill.api import metrics as api_metrics
from backfill.dispatch.dispatcher import Dispatcher
from backfill.dispatch.governor import Governor
from backfill.dispatch.policy import GovernorPolicy, PolicyConfig
from backfill.dispatch.signals import EngineLoad, RealtimeStats
from backfill.engines.base import EngineReply
from backfill.engines.openai import LOAD_SAMPLES, OpenAIEngine
from backfill.metrics import CONTENT_TYPE, Exposition, Family, by_model, parse
from backfill.service import Service
from backfill.settings import ModelConfig, Settings
from backfill.sim.metrics import EngineMetrics, render


def vllm_page(running: float = 3.0, count: float = 10.0, total: float = 0.15) -> str:
    """What vLLM (through prometheus_client) serves, cut down: gauges, a counter with its
    `_created`, a labelled counter, a histogram, a second model's series."""
    return f"""\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{model_name="meta-llama/Llama-3.1-8B"}} {running}
vllm:num_requests_running{{model_name="other"}} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{model_name="meta-llama/Llama-3.1-8B"}} 1.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{model_name="meta-llama/Llama-3.1-8B"}} 0.25
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{{model_name="meta-llama/Llama-3.1-8B"}} 1234.0
# HELP vllm:prompt_tokens_created Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_created gauge
vllm:prompt_tokens_created{{model_name="meta-llama/Llama-3.1-8B"}} 1.7e+09
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{{finished_reason="stop",model_name="meta-llama/Llama-3.1-8B"}} 5.0
vllm:request_success_total{{finished_reason="length",model_name="meta-llama/Llama-3.1-8B"}} 2.0
# HELP vllm:time_per_output_token_seconds Histogram of time per output token in seconds.
# TYPE vllm:time_per_output_token_seconds histogram
vllm:time_per_output_token_seconds_bucket{{le="0.01",model_name="meta-llama/Llama-3.1-8B"}} 4.0
vllm:time_per_output_token_seconds_bucket{{le="0.025",model_name="meta-llama/Llama-3.1-8B"}} 9.0
vllm:time_per_output_token_seconds_bucket{{le="+Inf",model_name="meta-llama/Llama-3.1-8B"}} 10.0
vllm:time_per_output_token_seconds_count{{model_name="meta-llama/Llama-3.1-8B"}} {count}
vllm:time_per_output_token_seconds_sum{{model_name="meta-llama/Llama-3.1-8B"}} {total}
"""


VLLM = vllm_page()

PARSED = {
    "vllm:num_requests_running": 5.0,  # both models, summed
    "vllm:num_requests_waiting": 1.0,
    "vllm:kv_cache_usage_perc": 0.25,
    "vllm:prompt_tokens_total": 1234.0,
    "vllm:prompt_tokens_created": 1.7e09,
    'vllm:request_success_total{finished_reason="stop"}': 5.0,
    'vllm:request_success_total{finished_reason="length"}': 2.0,
    'vllm:time_per_output_token_seconds_bucket{le="0.01"}': 4.0,
    'vllm:time_per_output_token_seconds_bucket{le="0.025"}': 9.0,
    'vllm:time_per_output_token_seconds_bucket{le="+Inf"}': 10.0,
    "vllm:time_per_output_token_seconds_count": 10.0,
    "vllm:time_per_output_token_seconds_sum": 0.15,
}


def test_parse_folds_model_name_and_keeps_other_labels_in_the_key() -> None:
    assert parse(VLLM) == PARSED


def test_parse_keeps_every_label_when_asked() -> None:
    values = parse(VLLM, drop_labels=())
    assert values['vllm:num_requests_running{model_name="other"}'] == 2.0
    key = (
        'vllm:time_per_output_token_seconds_bucket{le="0.025",model_name="meta-llama/Llama-3.1-8B"}'
    )
    assert values[key] == 9.0


def test_parse_escapes_label_values_as_the_text_does() -> None:
    text = 'm{path="a\\"b\\\\c\\nd",model_name="x"} 1\n'
    assert parse(text) == {'m{path="a\\"b\\\\c\\nd"}': 1.0}


def test_parse_folds_the_engine_label_summing_counts_and_averaging_kv_usage() -> None:
    # Issue 13: vLLM 0.32 labels every series `engine="0"` (one per data-parallel engine) as
    # well as `model_name`. Until it was folded too, the governor's plain-name lookups
    # ("vllm:num_requests_running") found nothing and it governed blind.
    text = VLLM.replace('model_name="meta-llama/Llama-3.1-8B"', 'engine="0",model_name="m"')
    values = parse(text)
    assert values["vllm:num_requests_running"] == 5.0  # engine 0 of "m" + "other"
    assert not any("engine=" in key for key in values)
    assert values["vllm:time_per_output_token_seconds_sum"] == 0.15
    two = text + text.replace('engine="0"', 'engine="1"').replace(
        'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.25',
        'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.75',
    )
    two = "\n".join(line for line in two.splitlines() if 'model_name="other"' not in line)
    values = parse(two, only=LOAD_SAMPLES)
    assert values["vllm:num_requests_running"] == 6.0  # 3 + 3: counts are summed
    assert values["vllm:time_per_output_token_seconds_count"] == 20.0
    assert values["vllm:kv_cache_usage_perc"] == 0.5  # (0.25 + 0.75) / 2: a ratio is averaged
    # the engine label is kept when asked
    kept = parse(two, drop_labels=("model_name",))
    assert kept['vllm:num_requests_running{engine="1"}'] == 3.0


def test_parse_reads_a_counter_typed_without_total_as_prometheus_client_names_it() -> None:
    text = "# TYPE requests counter\nrequests 7\n# TYPE up gauge\nup 1\nuntyped_one 2\n"
    assert parse(text) == {"requests_total": 7.0, "up": 1.0, "untyped_one": 2.0}


def test_parse_only_reads_the_named_samples_under_the_same_keys() -> None:
    only = ("vllm:num_requests_running", "vllm:time_per_output_token_seconds_sum")
    assert parse(VLLM, only=only) == {
        "vllm:num_requests_running": 5.0,
        "vllm:time_per_output_token_seconds_sum": 0.15,
    }
    full = parse(VLLM)
    assert parse(VLLM, only=LOAD_SAMPLES) == {
        k: v for k, v in full.items() if k.startswith(LOAD_SAMPLES)
    }


@pytest.mark.parametrize(
    "text",
    [
        "<html><body><h1>404 Not Found</h1></body></html>",
        '{"detail": "Not Found"}',
        "Not Found",
        'vllm:x{model_name="m" 1\n',
        "vllm:x one\n",
    ],
)
def test_parse_refuses_text_that_is_not_prometheus(text: str) -> None:
    with pytest.raises(ValueError):
        parse(text)


def test_parse_of_an_empty_page_is_empty() -> None:
    assert parse("") == {}


def engine() -> OpenAIEngine:
    return OpenAIEngine(ModelConfig(name="m", url="http://127.0.0.1:9/v1"))


def test_engine_parse_load_checks_the_first_page_whole_then_reads_only_load_samples() -> None:
    upstream = engine()
    with pytest.raises(ValueError):
        upstream.parse_load("<html>Not Found</html>")
    first = upstream.parse_load(VLLM)
    assert first == {k: v for k, v in PARSED.items() if k.startswith(LOAD_SAMPLES)}
    assert set(first) == {
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:time_per_output_token_seconds_count",
        "vllm:time_per_output_token_seconds_sum",
    }
    # later pages: only the load samples are parsed, with the same result
    assert upstream.parse_load(VLLM) == first
    assert upstream.parse_load(VLLM + "<html>\n") == first  # skipped unread


class _ScrapedEngine:
    """An engine whose `load_metrics` returns the next of `pages`, read by `read`."""

    model = "m"
    endpoints = frozenset({"/v1/chat/completions"})

    def __init__(self, pages: list[str], read: Callable[[str], dict[str, float]]) -> None:
        self.pages = pages
        self.read = read

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def send(self, endpoint: str, body: object, *, timeout: float | None = None) -> object:
        return EngineReply(200, b"{}")

    async def load_metrics(self) -> dict[str, float] | None:
        return self.read(self.pages.pop(0))


def test_the_governor_reads_the_same_load_from_load_samples_as_from_the_whole_page() -> None:
    later = vllm_page(running=7.0, count=30.0, total=0.55)

    async def loads(read: Callable[[str], dict[str, float]]) -> list[EngineLoad | None]:
        fake = _ScrapedEngine([VLLM, later], read)
        dispatcher = Dispatcher.from_config(fake, ModelConfig(name="m", url="x"))  # type: ignore[arg-type]
        governor = Governor(dispatcher, RealtimeStats(), GovernorPolicy(PolicyConfig(ceiling=8)))
        return [await governor.load(), await governor.load()]

    whole = asyncio.run(loads(parse))
    narrow = asyncio.run(loads(engine().parse_load))
    assert narrow == whole
    assert whole[1] is not None and whole[1].running == 9.0 and whole[1].kv_usage == 0.25
    assert whole[1].tpot == pytest.approx((0.55 - 0.15) / 20)


def families(models: dict[str, float]) -> list[Family]:
    return [
        Family("backfill_batch_limit", "gauge", "batch requests allowed at once", models),
        Family("backfill_batch_sent_total", "counter", "batch attempts sent", models),
        Family("backfill_governor_knee", "gauge", "sequences doubling the step time", {}),
    ]


def test_exposition_reads_back_with_prometheus_client_types_help_and_labels() -> None:
    live = {"b": 2.0, 'a"\\\n': 1.0}
    exposition = Exposition(lambda: by_model(families(live)))
    text = exposition.render().decode()
    assert text.index('model="a') < text.index('model="b"')  # sorted by model
    read = {m.name: m for m in text_string_to_metric_families(text)}
    assert set(read) == {"backfill_batch_limit", "backfill_batch_sent", "backfill_governor_knee"}
    limit, sent, knee = (
        read["backfill_batch_limit"],
        read["backfill_batch_sent"],
        read["backfill_governor_knee"],
    )
    assert (limit.type, limit.documentation) == ("gauge", "batch requests allowed at once")
    assert (sent.type, sent.documentation) == ("counter", "batch attempts sent")
    assert {(s.name, s.labels["model"], s.value) for s in sent.samples} == {
        ("backfill_batch_sent_total", "b", 2.0),
        ("backfill_batch_sent_total", 'a"\\\n', 1.0),
    }
    assert knee.type == "gauge" and knee.samples == []
    assert "# TYPE backfill_batch_sent_total counter" in text
    # the collector reads the live figures at every render
    live["b"] = 5.0
    again = parse(exposition.render().decode(), drop_labels=())
    assert again['backfill_batch_limit{model="b"}'] == 5.0


def test_metrics_route_serves_text_format_0_0_4() -> None:
    app = FastAPI()
    app.include_router(api_metrics.router(lambda: families({"m": 3.0})))

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get("/metrics")

    response = asyncio.run(get())
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")
    assert parse(response.text, drop_labels=()) == {
        'backfill_batch_limit{model="m"}': 3.0,
        'backfill_batch_sent_total{model="m"}': 3.0,
    }


def test_service_exports_every_dispatcher_counter(tmp_path: Path) -> None:
    config = ModelConfig(name="m", url="http://127.0.0.1:9/v1", max_concurrency=3)
    service = Service(Settings(data_dir=tmp_path, models=[config]))
    try:
        dispatcher = Dispatcher.from_config(service.engines["m"], config)
        service.dispatchers["m"] = dispatcher
        stats = dispatcher.stats
        stats.sent, stats.retried, stats.succeeded, stats.failed = 9, 3, 5, 1
        stats.transport_errors, stats.bad_bodies, stats.shed, stats.throttled = 2, 1, 4, 6
        stats.requests, stats.shared, stats.held = 12, 5, 7
        service.realtime_stats["m"].started()
        text = Exposition(lambda: by_model(service.metric_families())).render().decode()
    finally:
        service.close()
    kinds = {m.name: m.type for m in text_string_to_metric_families(text)}
    values = parse(text, drop_labels=())
    expected = {
        "backfill_batch_limit": ("gauge", 3),
        "backfill_batch_in_flight": ("gauge", 0),
        "backfill_batch_sent_total": ("counter", 9),
        "backfill_batch_retried_total": ("counter", 3),
        "backfill_batch_succeeded_total": ("counter", 5),
        "backfill_batch_failed_total": ("counter", 1),
        "backfill_batch_transport_errors_total": ("counter", 2),
        "backfill_batch_bad_bodies_total": ("counter", 1),
        "backfill_batch_shed_total": ("counter", 4),
        "backfill_batch_throttled_total": ("counter", 6),
        "backfill_batch_deferred": ("gauge", 0),
        "backfill_batch_requests_total": ("counter", 12),
        "backfill_batch_shared_total": ("counter", 5),
        "backfill_batch_held_total": ("counter", 7),
        "backfill_realtime_in_flight": ("gauge", 1),
        "backfill_realtime_requests_total": ("counter", 1),
    }
    for name, (kind, value) in expected.items():
        assert kinds[name.removesuffix("_total")] == kind, name
        assert values[f'{name}{{model="m"}}'] == value, name
    for name in ("reference", "knee", "trim", "idle"):  # no governor: the family, no series
        assert kinds[f"backfill_governor_{name}"] == "gauge"


def test_sim_render_reads_back_with_vllm_types() -> None:
    metrics = EngineMetrics()
    metrics.tpot.observe(0.02, 4)
    metrics.tpot.observe(100.0)  # past the last bound: +Inf only
    text = render(metrics, model="m", running=1, waiting=0, kv_usage=0.5, sim_time=2.0)
    kinds = {m.name: m.type for m in text_string_to_metric_families(text)}
    assert kinds["vllm:num_requests_running"] == "gauge"
    assert kinds["vllm:prompt_tokens"] == "counter"
    assert kinds["vllm:inter_token_latency_seconds"] == "histogram"
    assert "vllm:time_per_output_token_seconds" not in kinds  # as vLLM 0.32: gone
    assert 'vllm:num_requests_running{engine="0",model_name="m"} 1.0' in text  # vLLM 0.32's
    values = parse(text)
    assert values['vllm:inter_token_latency_seconds_bucket{le="0.025"}'] == 4
    assert values['vllm:inter_token_latency_seconds_bucket{le="80.0"}'] == 4
    assert values['vllm:inter_token_latency_seconds_bucket{le="+Inf"}'] == 5
    assert values["vllm:inter_token_latency_seconds_count"] == 5
    assert values["vllm:inter_token_latency_seconds_sum"] == pytest.approx(100.08)
    assert values['vllm:request_success_total{finished_reason="length"}'] == 0


def test_real_time_ledger_writes_and_losses_are_on_metrics(tmp_path: Path) -> None:
    """A real-time entry a store failure loses is logged and counted on /metrics, never
    silent (and never the client's error)."""
    from backfill.api.app import create_app
    from backfill.api.context import ApiContext
    from backfill.blobs import open_blobs
    from backfill.domain.records import Usage
    from backfill.errors import StoreBusy
    from backfill.store.memory import MemoryStore

    store = MemoryStore()
    ctx = ApiContext(Settings(data_dir=tmp_path), store, open_blobs(None, tmp_path))
    app = create_app(ctx)
    ledger = ctx.realtime_ledger
    assert ledger is not None
    project = store.ensure_project("p")

    async def main() -> httpx.Response:
        await ledger.record(project, "m", "/v1/chat/completions", Usage(3, 0, 2), 0.1, 1)

        def broken(entry: object) -> bool:
            raise StoreBusy("locked")

        store.record_usage = broken  # type: ignore[method-assign]
        await ledger.record(project, "m", "/v1/chat/completions", Usage(3, 0, 2), 0.1, 2)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get("/metrics")

    values = parse(asyncio.run(main()).text, drop_labels=())
    assert values['backfill_realtime_ledger_recorded_total{model="m"}'] == 1.0
    assert values['backfill_realtime_ledger_unrecorded_total{model="m"}'] == 1.0
