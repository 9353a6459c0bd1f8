"""Live load signals shared between the real-time gateway and the governor, in-process.

`RealtimeStats` (one per model) is written by the gateway on every real-time request and read
by the governor on every tick: plain attributes and lists, no locks (one event loop), no
per-request objects kept beyond the latency samples not yet read. The governor is the only
reader: `drain_tpots()` hands over the samples gathered since its last tick.

TPOT is wall seconds as the gateway sees them, `(last bytes - first bytes) / (tokens - 1)` of a
streamed answer, with the token count read from the stream's usage chunk when present, else the
number of SSE events (an upper bound on TPOT when an upstream packs several tokens into one
event). Time to first token is not collected: the policy plans TTFT from the engine model and
the real-time load, not from samples (`docs/governor.md`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


class RealtimeStats:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.in_flight = 0
        self.arrivals = 0  # cumulative
        self._tpot: list[float] = []

    def now(self) -> float:
        return self._clock()

    def started(self) -> None:
        """A real-time request arrived."""
        self.in_flight += 1
        self.arrivals += 1

    def ended(self, tpot: float | None = None) -> None:
        """A real-time request finished; `tpot`: its streamed answer's TPOT, if measured."""
        self.in_flight -= 1
        if tpot is not None and len(self._tpot) < 65536:
            self._tpot.append(tpot)

    def drain_tpots(self) -> list[float]:
        """TPOTs recorded since the last call."""
        tpot, self._tpot = self._tpot, []
        return tpot


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """What the upstream's metrics say, at one scrape (vLLM's names, or SGLang's or llama.cpp's:
    `backfill.metrics.RUNNING` etc.; several engines behind one server summed, KV averaged)."""

    running: float  # vllm:num_requests_running
    waiting: float  # vllm:num_requests_waiting (0 when not served)
    kv_usage: float  # vllm:kv_cache_usage_perc, 0..1 (0 when not served)
    #: mean inter-token latency of every token generated since the previous scrape (engine's
    #: clock), None when no token was generated
    tpot: float | None = None


@dataclass(frozen=True, slots=True)
class Signals:
    """Everything the policy sees at one tick."""

    now: float  # seconds (monotonic)
    rt_in_flight: int  # real-time requests the gateway has at the engine
    rt_arrivals: int  # since the previous tick
    batch_in_flight: int  # batch requests at the engine
    batch_throttled: int = 0  # batch answers 429/503 since the previous tick
    rt_tpot: tuple[float, ...] = ()  # real-time TPOTs since the previous tick (wall seconds)
    engine: EngineLoad | None = None  # None: the upstream serves no metrics
