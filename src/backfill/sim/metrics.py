"""vLLM-named metrics of the simulated engine, and the Prometheus text format both ways.

The engine updates plain attributes of `EngineMetrics` in its step loop (no locks, no
per-token objects); `render` writes them in Prometheus text format under vLLM v1's names with
a `model_name` label, so a scraper written for a real vLLM server reads the simulator
unchanged; `parse` reads such text back into `{sample name with labels: value}` for tests,
benches and the governor.

Served (all times are *simulated* seconds):

- gauges `vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`
  (0..1; also under the older name `vllm:gpu_cache_usage_perc`),
- counters `vllm:prompt_tokens_total`, `vllm:generation_tokens_total`,
  `vllm:num_preemptions_total`, `vllm:prefix_cache_queries_total`,
  `vllm:prefix_cache_hits_total` (both in tokens), `vllm:request_success_total`,
- histograms `vllm:time_to_first_token_seconds`, `vllm:time_per_output_token_seconds` (one
  observation per output token after the first: its inter-token latency, as vLLM v1 does),
  `vllm:e2e_request_latency_seconds`, `vllm:request_queue_time_seconds`,
- simulator extras `backfill_sim_time_seconds` (the simulated clock),
  `backfill_sim_busy_seconds_total` (simulated time spent in steps), `backfill_sim_steps_total`,
  `backfill_sim_lag_seconds_total` (wall seconds the step loop fell behind its schedule; more
  than a little means the host cannot keep up with `--speedup`).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

__all__ = ["EngineMetrics", "Histogram", "parse", "render"]

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


def _labels(model: str) -> str:
    escaped = model.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'model_name="{escaped}"'


def _number(value: float) -> str:
    return repr(float(value))


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
    label = _labels(model)
    out: list[str] = []

    def scalar(name: str, kind: str, help_: str, value: float, extra: str = "") -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        out.append(f"{name}{{{label}{extra}}} {_number(value)}")

    def histogram(name: str, help_: str, hist: Histogram) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} histogram")
        cumulative = 0
        for bound, count in zip(hist.bounds, hist.counts, strict=False):
            cumulative += count
            out.append(f'{name}_bucket{{{label},le="{bound}"}} {float(cumulative)!r}')
        out.append(f'{name}_bucket{{{label},le="+Inf"}} {float(hist.count)!r}')
        out.append(f"{name}_count{{{label}}} {float(hist.count)!r}")
        out.append(f"{name}_sum{{{label}}} {_number(hist.sum)}")

    scalar("vllm:num_requests_running", "gauge", "Requests in model execution batches.", running)
    scalar("vllm:num_requests_waiting", "gauge", "Requests waiting to be processed.", waiting)
    scalar("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent.", kv_usage)
    scalar("vllm:gpu_cache_usage_perc", "gauge", "Deprecated alias of kv_cache_usage_perc.",
           kv_usage)  # fmt: skip
    scalar("vllm:num_preemptions_total", "counter", "Cumulative preemptions.", metrics.preemptions)
    scalar("vllm:prompt_tokens_total", "counter", "Prefill tokens processed.",
           metrics.prompt_tokens)  # fmt: skip
    scalar("vllm:generation_tokens_total", "counter", "Generation tokens processed.",
           metrics.generation_tokens)  # fmt: skip
    scalar("vllm:prefix_cache_queries_total", "counter", "Prefix cache queries, in tokens.",
           metrics.prefix_queries)  # fmt: skip
    scalar("vllm:prefix_cache_hits_total", "counter", "Prefix cache hits, in tokens.",
           metrics.prefix_hits)  # fmt: skip
    scalar("vllm:request_success_total", "counter", "Successfully finished requests.",
           metrics.requests_finished, ',finished_reason="length"')  # fmt: skip
    histogram("vllm:time_to_first_token_seconds", "Time to first token (sim s).", metrics.ttft)
    histogram("vllm:time_per_output_token_seconds", "Inter-token latency (sim s).", metrics.tpot)
    histogram("vllm:e2e_request_latency_seconds", "End-to-end latency (sim s).", metrics.e2e)
    histogram("vllm:request_queue_time_seconds", "Time in the waiting queue (sim s).",
              metrics.queue)  # fmt: skip
    scalar("backfill_sim_time_seconds", "gauge", "Simulated clock.", sim_time)
    scalar("backfill_sim_busy_seconds_total", "counter", "Simulated time spent in steps.",
           metrics.busy_s)  # fmt: skip
    scalar("backfill_sim_steps_total", "counter", "Engine steps.", metrics.steps)
    scalar("backfill_sim_lag_seconds_total", "counter", "Wall time the loop fell behind.", lag_s)
    return "\n".join(out) + "\n"


def parse(text: str, *, drop_labels: Sequence[str] = ("model_name",)) -> dict[str, float]:
    """Prometheus text -> `{name or name{labels}: value}`, without the labels in `drop_labels`.

    `parse(text)["vllm:num_requests_running"]`,
    `parse(text)['vllm:time_to_first_token_seconds_bucket{le="0.1"}']`. Samples that differ
    only in dropped labels are summed.
    """
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, brace, rest = head.partition("{")
        if brace:
            kept = []
            for pair in rest.rstrip("}").split(","):
                key = pair.partition("=")[0]
                if pair and key not in drop_labels:
                    kept.append(pair)
            if kept:
                name = name + "{" + ",".join(kept) + "}"
        out[name] = out.get(name, 0.0) + float(value)
    return out
