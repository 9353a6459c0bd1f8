"""What the API needs from the composition root, and nothing more.

The API talks to the store and the blob store through their interfaces and knows which models
are served (and on which endpoints), and, for the real-time gateway, their engines. It never
imports the scheduler or the worker: creating a batch writes a `validating` row, cancelling
writes `cancelling`; background duties do the rest.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from backfill.api.metrics import MetricFamily
from backfill.blobs.base import Blobs
from backfill.dispatch.signals import RealtimeStats
from backfill.engines.base import Engine
from backfill.settings import Settings
from backfill.store.base import Store

if TYPE_CHECKING:
    from backfill.api.ledger import RealtimeLedger


@dataclass
class RealtimeModel:
    """What the real-time gateway needs to serve one model."""

    name: str
    engine: Engine
    #: the upstream accepts vLLM's `priority` field
    priority: bool = False
    #: shared with the model's governor
    stats: RealtimeStats = field(default_factory=RealtimeStats)


@dataclass(frozen=True)
class Latency:
    """Recent real-time latency samples of one kind, in seconds."""

    p50: float
    p90: float
    samples: int


@dataclass(frozen=True)
class ModelLoad:
    """One model's batch and real-time load right now, for the dashboard (`api/dashboard.py`)."""

    name: str
    #: batch requests allowed at once (the governor's limit, or the fixed `max_concurrency`)
    batch_limit: int
    batch_in_flight: int
    #: long prompts waiting outside the window
    batch_deferred: int
    realtime_in_flight: int
    realtime_requests: int
    #: time to first token and per output token of streamed real-time answers, as the gateway
    #: measured them (None: no sample yet)
    ttft: Latency | None = None
    tpot: Latency | None = None
    #: "off" (fixed limit), "starting" (no decision yet), "dormant", "idle" or "reference"
    governor: str = "off"
    #: the real-time peak the governor plans for (None: no governor)
    reference: float | None = None
    #: the governor reads the engine's own metrics
    engine_metrics: bool = False


@dataclass
class ApiContext:
    settings: Settings
    store: Store
    blobs: Blobs
    #: public model name -> endpoints it serves (e.g. {"/v1/chat/completions", ...})
    models: dict[str, frozenset[str]] = field(default_factory=dict)
    #: public model name -> engine for the real-time gateway (empty: it answers 404)
    realtime: dict[str, RealtimeModel] = field(default_factory=dict)
    clock: Callable[[], float] = time.time
    #: the figures `GET /metrics` shows (see `api/metrics.py`)
    metrics: Callable[[], list[MetricFamily]] = list
    #: each model's load for the dashboard's models view (`api/dashboard.py`)
    model_loads: Callable[[], list[ModelLoad]] = list
    #: where the gateway writes real-time usage (`api/ledger.py`); made by `create_app`
    realtime_ledger: RealtimeLedger | None = None

    def now(self) -> int:
        return int(self.clock())
