"""vLLM-named metrics of the simulated engine.

The engine updates plain attributes of `EngineMetrics` in its step loop (no locks, no
per-token objects, no prometheus_client objects: `Histogram.observe` is one bisect and three
adds). Only a scrape builds metrics from them: `families` names and labels them as vLLM 0.32
does, every series with `model_name` and `engine="0"` (the data-parallel engine's index; the
simulator is one engine), so a scraper written for a real vLLM server reads the simulator
unchanged, and one that misses the `engine` label fails against it as against vLLM,
and `render` writes them through `backfill.metrics` (prometheus_client), the same exposition
backfill's own `/metrics` uses (slower than the hand-written renderer it replaced, ~1 ms a
scrape against ~0.07, and not seen in the step loop at the governor's 10 scrapes a second; see
`backfill.metrics`). `parse` is `backfill.metrics.parse`, named here too for the tests and
benches that read a simulator's `/metrics`.

Served (all times are *simulated* seconds):

- gauges `vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`
  (0..1; not under the older `vllm:gpu_cache_usage_perc`, gone from vLLM 0.32),
- counters `vllm:prompt_tokens_total`, `vllm:generation_tokens_total`,
  `vllm:num_preemptions_total`, `vllm:prefix_cache_queries_total`,
  `vllm:prefix_cache_hits_total` (both in tokens), `vllm:request_success_total`,
- histograms `vllm:time_to_first_token_seconds`, `vllm:inter_token_latency_seconds` (one
  observation per output token after the first, as vLLM does; vLLM 0.32 serves no
  `vllm:time_per_output_token_seconds`),
  `vllm:e2e_request_latency_seconds`, `vllm:request_queue_time_seconds`,
- simulator extras `backfill_sim_time_seconds` (the simulated clock),
  `backfill_sim_busy_seconds_total` (simulated time spent in steps), `backfill_sim_steps_total`,
  `backfill_sim_lag_seconds_total` (wall seconds the step loop fell behind its schedule; more
  than a little means the host cannot keep up with `--speedup`).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

from backfill.metrics import Exposition, Metric, counter, gauge, histogram, parse

__all__ = ["EngineMetrics", "Histogram", "families", "parse", "render"]

# vLLM v1's buckets (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
TPOT_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


class Histogram:
    """Cumulative-on-render histogram: `counts[i]` observations in bucket i (non-cumulative)."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect_left(self.bounds, value)] += times
        self.sum += value * times
        self.count += times


class EngineMetrics:
    """Counters and histograms the engine updates as it steps."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.preemptions = 0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.requests_finished = 0
        self.requests_aborted = 0
        self.steps = 0
        self.busy_s = 0.0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.e2e = Histogram(LATENCY_BUCKETS)
        self.queue = Histogram(LATENCY_BUCKETS)


def families(
    metrics: EngineMetrics,
    *,
    model: str,
    running: int,
    waiting: int,
    kv_usage: float,
    sim_time: float,
    lag_s: float = 0.0,
) -> list[Metric]:
    """The engine's state and metrics under vLLM 0.32's names and labels, one series each."""
    label = {"model_name": model, "engine": "0"}

    def hist(name: str, help_text: str, h: Histogram) -> Metric:
        return histogram(name, help_text, label, h.bounds, h.counts, h.sum)

    m = metrics
    return [
        gauge("vllm:num_requests_running", "Requests in model execution batches.", label, running),
        gauge("vllm:num_requests_waiting", "Requests waiting to be processed.", label, waiting),
        gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent.", label, kv_usage),
        counter("vllm:num_preemptions_total", "Cumulative preemptions.", label, m.preemptions),
        counter("vllm:prompt_tokens_total", "Prefill tokens processed.", label, m.prompt_tokens),
        counter("vllm:generation_tokens_total", "Generation tokens processed.", label,
                m.generation_tokens),
        counter("vllm:prefix_cache_queries_total", "Prefix cache queries, in tokens.", label,
                m.prefix_queries),
        counter("vllm:prefix_cache_hits_total", "Prefix cache hits, in tokens.", label,
                m.prefix_hits),
        counter("vllm:request_success_total", "Successfully finished requests.",
                {**label, "finished_reason": "length"}, m.requests_finished),
        hist("vllm:time_to_first_token_seconds", "Time to first token (sim s).", m.ttft),
        hist("vllm:inter_token_latency_seconds", "Inter-token latency (sim s).", m.tpot),
        hist("vllm:e2e_request_latency_seconds", "End-to-end latency (sim s).", m.e2e),
        hist("vllm:request_queue_time_seconds", "Time in the waiting queue (sim s).", m.queue),
        gauge("backfill_sim_time_seconds", "Simulated clock.", label, sim_time),
        counter("backfill_sim_busy_seconds_total", "Simulated time spent in steps.", label,
                m.busy_s),
        counter("backfill_sim_steps_total", "Engine steps.", label, m.steps),
        counter("backfill_sim_lag_seconds_total", "Wall time the loop fell behind.", label, lag_s),
    ]  # fmt: skip


def render(
    metrics: EngineMetrics,
    *,
    model: str,
    running: int,
    waiting: int,
    kv_usage: float,
    sim_time: float,
    lag_s: float = 0.0,
) -> str:
    """Prometheus text exposition (format 0.0.4) of the engine's state and metrics."""
    figures = families(
        metrics,
        model=model,
        running=running,
        waiting=waiting,
        kv_usage=kv_usage,
        sim_time=sim_time,
        lag_s=lag_s,
    )
    return Exposition(lambda: figures).render().decode()
