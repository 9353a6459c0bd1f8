"""Prometheus metrics, both ways: the one home of `prometheus_client`.

Three callers, one format. `GET /metrics` (`api/metrics.py`) exposes backfill's own figures;
`OpenAIEngine.load_metrics` reads an upstream's (vLLM's) `/metrics` for the governor; the
simulator (`sim/`) exposes vLLM-named metrics of its own. Exposition and parsing of the same
text format are one concern, so they live together here, at the top level like `settings` and
`errors`: `api`, `engines` and `sim` each import it, and none of them imports another for it.

Exposition. Figures are not instrumented with prometheus_client's own `Counter`/`Gauge`
objects: the dispatchers, the gateway and the governors keep plain ints and floats on their hot
paths (`DispatchStats`, `RealtimeStats`, the sim engine's `EngineMetrics`), and a collector
reads them at scrape time. `Exposition` is a `CollectorRegistry` of its own (never the
process-global one, so no process or GC metrics are added and tests never share state) holding
one such collector; `render()` is `generate_latest`, the text format 0.0.4. `Family` is the
plain shape the composition root hands over (name, type, help, value per model), so neither
`service.py` nor the API sees a prometheus_client type; `by_model` turns families into metrics
with one `model` label, sorted by model (a family whose `labels` name more, as the replicas'
`("model", "replica")`, has its values keyed by tuples of label values). `gauge`, `counter` and
`histogram` build single-series metrics for the simulator, whose histograms are counted in
plain lists as the engine steps.

Parsing. `parse` reads the text with `prometheus_client.parser` into the flat
`{sample name, or name{labels}: value}` dict the governor looks names up in
(`dispatch/governor.py`): every sample is kept under its own name (`x_bucket`, `x_sum`,
`x_count`, `x_created`, summaries' `{quantile=...}` samples), the labels kept stay in the key as
`k="v"` pairs in the order the text gives them (escaped as in the text), and samples that
differ only in folded labels are combined: summed, or averaged for the ratios in `mean`
(`RATIOS` by default: KV usage is a fraction of each engine's own cache, so two engines at 0.5
are a server at 0.5, not 1.0). Folded by default: `PLACEMENT_LABELS`, the labels that say where
a series ran rather than what it measures (vLLM's `model_name` and, since its data-parallel
engines, `engine="0"`, `engine="1"`; SGLang's `tp_rank`/`pp_rank`/`dp_rank`); `keep_labels`
instead names the only labels to keep (the load path keeps none). A counter whose `# TYPE`
name lacks `_total` (not vLLM's, which always has it) is read under `name_total`, as
prometheus_client's parser names it. Text that is not the format raises `ValueError`.

Load names. The governor reads four figures from whatever engine serves the model; `RUNNING`,
`WAITING`, `KV_USAGE` and `TPOT` list each figure's names by engine family, first found wins:
vLLM (current and older names), SGLang, llama.cpp (`llama-server --metrics`, no labels; its
TPOT is the generation-time and generated-token counters, whose deltas give seconds a token as
a histogram's `_sum`/`_count` do). `LOAD_SAMPLES` is every one of those names, the `only` of
the governor's scrapes.

Cost. prometheus_client is slower than the hand-written renderer and parser it replaced (~35 us
a parsed line against ~2; a render of the simulator's 145 lines ~0.8-1.7 ms against ~0.07).
Figures here were measured ad hoc when this module was written (no bench script repeats
them). Renders happen once a scrape; in the simulator's step loop, with 192 streams at
`--speedup 10`, 10 scrapes a second left no lag, 100 a second 0.16 s in 15 s (0.06 s by
hand). A whole vLLM page (~500 lines) takes ~18 ms to parse, too much for the governor's 10
scrapes a second on the loop that relays real-time streams: `parse(only=...)` skips the lines
of the samples the caller does not read before the parser sees them (`engines/openai.py` reads
~10 lines, ~0.5 ms a page).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import Literal, NamedTuple

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

__all__ = [
    "CONTENT_TYPE",
    "KV_USAGE",
    "LOAD_SAMPLES",
    "PLACEMENT_LABELS",
    "RATIOS",
    "RUNNING",
    "TPOT",
    "WAITING",
    "Exposition",
    "Family",
    "Kind",
    "Metric",
    "by_model",
    "counter",
    "gauge",
    "histogram",
    "parse",
]

#: labels that say where a series ran, not what it measures: folded by `parse` by default
PLACEMENT_LABELS = ("model_name", "engine", "tp_rank", "pp_rank", "dp_rank")
#: gauges that are ratios (0..1 of each engine's own cache): averaged when series are folded
RATIOS = frozenset(
    {
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
        "sglang:token_usage",
        "llamacpp:kv_cache_usage_ratio",
    }
)
#: requests in the engine's running batch, by engine family (first found wins)
RUNNING = ("vllm:num_requests_running", "sglang:num_running_reqs", "llamacpp:requests_processing")
#: requests queued at the engine
WAITING = ("vllm:num_requests_waiting", "sglang:num_queue_reqs", "llamacpp:requests_deferred")
#: KV-cache usage, 0..1
KV_USAGE = (
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",  # vLLM before 0.10
    "sglang:token_usage",
    "llamacpp:kv_cache_usage_ratio",  # llama.cpp builds before the unified KV cache
)
#: (seconds, tokens) counters whose deltas give the mean inter-token latency
TPOT = (
    ("vllm:inter_token_latency_seconds_sum", "vllm:inter_token_latency_seconds_count"),
    ("vllm:time_per_output_token_seconds_sum", "vllm:time_per_output_token_seconds_count"),
    ("sglang:inter_token_latency_seconds_sum", "sglang:inter_token_latency_seconds_count"),
    ("sglang:time_per_output_token_seconds_sum", "sglang:time_per_output_token_seconds_count"),
    ("llamacpp:tokens_predicted_seconds_total", "llamacpp:tokens_predicted_total"),
)
#: every sample the governor reads, the `only` of its scrapes
LOAD_SAMPLES = RUNNING + WAITING + KV_USAGE + tuple(name for pair in TPOT for name in pair)


def first_of(figures: dict[str, float], names: tuple[str, ...]) -> float | None:
    """The first of `names` (an engine's names for one figure, newest first) that `figures`
    holds, or None."""
    for name in names:
        value = figures.get(name)
        if value is not None:
            return value
    return None


#: the content type of `Exposition.render()`'s text (what `generate_latest` writes)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


#: the types of backfill's own metrics
Kind = Literal["gauge", "counter"]


class Family(NamedTuple):
    """One metric of backfill's own `/metrics`: a value per model, or per tuple of label values
    when `labels` names more than the model."""

    name: str  # counters end in `_total`, as exposed
    kind: Kind
    help: str
    values: Mapping[str, float] | Mapping[tuple[str, ...], float]  # model (or labels) -> value
    labels: tuple[str, ...] = ("model",)


def by_model(families: Iterable[Family]) -> Iterator[Metric]:
    """Each family as a metric with its `labels`, series sorted by model (then the others)."""
    for family in families:
        metric = (CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily)(
            family.name, family.help, labels=list(family.labels)
        )
        for key, value in sorted(family.values.items()):
            metric.add_metric([key] if isinstance(key, str) else list(key), float(value))
        yield metric


def gauge(name: str, help_text: str, labels: Mapping[str, str], value: float) -> Metric:
    """A gauge with one series."""
    metric = GaugeMetricFamily(name, help_text, labels=list(labels))
    metric.add_metric(list(labels.values()), float(value))
    return metric


def counter(name: str, help_text: str, labels: Mapping[str, str], value: float) -> Metric:
    """A counter with one series (`name` ends in `_total`, as exposed)."""
    metric = CounterMetricFamily(name, help_text, labels=list(labels))
    metric.add_metric(list(labels.values()), float(value))
    return metric


def histogram(
    name: str,
    help_text: str,
    labels: Mapping[str, str],
    bounds: Sequence[float],
    counts: Sequence[int],
    total: float,
) -> Metric:
    """A histogram with one series from per-bucket counts (not cumulative): `counts[i]`
    observations above `bounds[i - 1]` and at most `bounds[i]`; `counts[-1]` those past the
    last bound. `le` values are written as `repr(float(bound))`, as the simulator always did."""
    buckets: list[tuple[str, float]] = []
    cumulative = 0
    for bound, count in zip(bounds, counts, strict=False):
        cumulative += count
        buckets.append((repr(float(bound)), float(cumulative)))
    buckets.append(("+Inf", float(sum(counts))))
    metric = HistogramMetricFamily(name, help_text, labels=list(labels))
    metric.add_metric(list(labels.values()), buckets, float(total))
    return metric


class _Reader:
    """The registry's one collector: reads the live figures at every scrape."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


class Exposition:
    """A registry of its own whose collector calls `collect` at every `render()`."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        # auto_describe off: the metric names are not fixed (and `collect` may not be ready to
        # run until the first scrape)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Reader(collect))

    def render(self) -> bytes:
        """The Prometheus text format 0.0.4 (`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _only(text: str, prefixes: tuple[str, ...]) -> str:
    """The lines of `text` whose sample name, or `# HELP`/`# TYPE` name, starts with one of
    `prefixes`."""
    kept = []
    for line in text.splitlines():
        name = line[7:] if line.startswith(("# HELP ", "# TYPE ")) else line
        if name.startswith(prefixes):
            kept.append(line)
    return "\n".join(kept)


def parse(
    text: str,
    *,
    drop_labels: Collection[str] = PLACEMENT_LABELS,
    keep_labels: Collection[str] | None = None,
    mean: Collection[str] = RATIOS,
    only: Sequence[str] | None = None,
) -> dict[str, float]:
    """Prometheus text -> `{name or name{labels}: value}`, with the labels in `drop_labels`
    folded (or, when `keep_labels` is given, every label but those).

    `parse(text)["vllm:num_requests_running"]`,
    `parse(text)['vllm:time_to_first_token_seconds_bucket{le="0.1"}']`. Samples that differ
    only in folded labels are summed, or averaged when their name is in `mean`. `only`:
    sample-name prefixes to read (say `"vllm:inter_token_latency_seconds_sum"`); every other
    line is skipped before parsing, and the samples read keep the keys a full parse gives them.
    prometheus_client's parser takes ~20-35 us a line, ~10-18 ms for a vLLM page of ~500
    lines, so a caller that scrapes often and reads a few figures passes `only`. Raises
    `ValueError` for text that is not the format.
    """
    if only is not None:
        text = _only(text, tuple(only))
    out: dict[str, float] = {}
    seen: dict[str, int] = {}  # series folded into each key averaged (names in `mean`)
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = sample.name
                if keep_labels is None:
                    kept = [
                        f'{k}="{_escape(v)}"'
                        for k, v in sample.labels.items()
                        if k not in drop_labels
                    ]
                else:
                    kept = [
                        f'{k}="{_escape(v)}"' for k, v in sample.labels.items() if k in keep_labels
                    ]
                if kept:
                    key = key + "{" + ",".join(kept) + "}"
                out[key] = out.get(key, 0.0) + float(sample.value)
                if sample.name in mean:
                    seen[key] = seen.get(key, 0) + 1
    except (IndexError, KeyError, TypeError) as exc:
        # only ValueError came out of 20,000 mutated vLLM pages; callers catch that one type
        raise ValueError(f"not Prometheus text: {exc!r}") from exc
    for key, series in seen.items():
        if series > 1:
            out[key] /= series
    return out
