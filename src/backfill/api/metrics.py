"""`GET /metrics`: the operator's view of batch vs real time per model, in Prometheus text.

Per model: the batch limit the governor set (or the fixed `max_concurrency`), batch requests in
flight, sent, shed, throttled and deferred (long prompts waiting); real-time requests in flight
and received; and, for governed models, what the last decision was based on (the reference real-
time peak, the knee of the step-time model, the trim factor, idle). These are the figures to
watch next to vLLM's own `/metrics` when tuning the latency budget.

Like vLLM's `/metrics` it needs no key: it carries model names and load figures, nothing of
any project's files or batches. The composition root supplies the numbers through
`ApiContext.metrics` (the API never imports the dispatcher or the governor).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from fastapi import APIRouter
from starlette.responses import Response

from backfill.api import openapi

#: (name, kind "gauge" | "counter", help, value per model)
MetricFamily = tuple[str, str, str, dict[str, float]]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(families: Iterable[MetricFamily]) -> str:
    """The Prometheus text exposition of these families (one `model` label each)."""
    lines: list[str] = []
    for name, kind, help_text, values in families:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for model, value in sorted(values.items()):
            lines.append(f'{name}{{model="{_label(model)}"}} {float(value)!r}')
    return "\n".join(lines) + "\n"


def router(collect: Callable[[], list[MetricFamily]]) -> APIRouter:
    api = APIRouter()

    @api.get("/metrics", **openapi.METRICS)
    async def metrics() -> Response:
        return Response(render(collect()), media_type=CONTENT_TYPE)

    return api
