"""`GET /metrics`: the operator's view of batch vs real time per model, in Prometheus text.

Per model: the batch limit the governor set (or the fixed `max_concurrency`), batch requests in
flight, sent, retried, succeeded, failed, unreachable upstream, bad bodies, shed, throttled and
deferred (long prompts waiting); real-time requests in flight and received; and, for governed
models, what the last decision was based on (the reference real-time peak, the knee of the
step-time model, the trim factor, idle). These are the figures to watch next to vLLM's own
`/metrics` when tuning the latency budget. A model with several replicas also has per-replica
series (`backfill_replica_*`, labels `model` and `replica`, the replica's URL).

Like vLLM's `/metrics` it needs no key: it carries model names and load figures, nothing of
any project's files or batches. The composition root supplies the numbers through
`ApiContext.metrics` (the API never imports the dispatcher or the governor); this module only
routes: the text is written by `backfill.metrics` (prometheus_client), whose collector calls
`ApiContext.metrics` at every scrape.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter
from starlette.responses import Response

from backfill.api import openapi
from backfill.metrics import CONTENT_TYPE, Exposition, by_model
from backfill.metrics import Family as MetricFamily

__all__ = ["MetricFamily", "router"]


def router(collect: Callable[[], list[MetricFamily]]) -> APIRouter:
    api = APIRouter()
    exposition = Exposition(lambda: by_model(collect()))

    @api.get("/metrics", **openapi.METRICS)
    async def metrics() -> Response:
        return Response(exposition.render(), media_type=CONTENT_TYPE)

    return api
