"""Live load signals shared between the real-time gateway and the governor, in-process.

`RealtimeStats` (one per model) is written by the gateway on every real-time request and read
by the governor on every tick: plain attributes and lists, no locks (one event loop), no
per-request objects kept beyond the latency samples not yet read and the streams still waiting
for their first bytes. The governor is the only reader: `drain_tpots()` / `drain_ttfts()` hand
over the samples gathered since its last tick.

TPOT is wall seconds as the gateway sees them, `(last bytes - first bytes) / (tokens - 1)` of a
streamed answer, with the token count read from the stream's usage chunk when present, else the
number of SSE events (an upper bound on TPOT when an upstream packs several tokens into one
event).

TTFT is wall seconds from the gateway's call to the upstream to the stream's first body bytes
(not its headers: vLLM's and SGLang's servers send those before the first token), reported by
the gateway's relay (`api/realtime.py`: `stream_opened`, `first_bytes`, `closed`).
`awaiting()` also says how long the oldest stream still without its first bytes has waited, so
the governor sees a real-time request queued at the engine before it is served. Without engine
metrics that is how the governor sees real time queueing behind batch requests at an engine
that runs few requests at once (`docs/governor.md`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

#: latency samples kept between two governor ticks at most (a tick drains them)
MAX_SAMPLES = 65536


class RealtimeStats:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.in_flight = 0
        self.arrivals = 0  # cumulative
        self._tpot: list[float] = []
        self._ttft: list[float] = []
        #: streams waiting for their first bytes: key -> when the gateway called the upstream
        #: (dicts keep insertion order: the first is the oldest)
        self._awaiting: dict[int, float] = {}
        self._keys = 0

    def now(self) -> float:
        return self._clock()

    def started(self) -> None:
        """A real-time request arrived."""
        self.in_flight += 1
        self.arrivals += 1

    def ended(self, tpot: float | None = None) -> None:
        """A real-time request finished; `tpot`: its streamed answer's TPOT, if measured."""
        self.in_flight -= 1
        if tpot is not None and len(self._tpot) < MAX_SAMPLES:
            self._tpot.append(tpot)

    def drain_tpots(self) -> list[float]:
        """TPOTs recorded since the last call."""
        tpot, self._tpot = self._tpot, []
        return tpot

    # -- time to first token (the gateway's relay) ------------------------------------------
    def stream_opened(self) -> int:
        """A stream was asked of the upstream; returns its key for `first_bytes`/`closed`."""
        self._keys += 1
        self._awaiting[self._keys] = self._clock()
        return self._keys

    def first_bytes(self, key: int) -> None:
        """The stream's first body bytes arrived: its TTFT is recorded."""
        opened = self._awaiting.pop(key, None)
        if opened is not None and len(self._ttft) < MAX_SAMPLES:
            self._ttft.append(self._clock() - opened)

    def closed(self, key: int) -> None:
        """The stream ended or failed (no TTFT if it never sent a byte: an error, a drop)."""
        self._awaiting.pop(key, None)

    def awaiting(self) -> tuple[int, float]:
        """Streams still waiting for their first bytes, and how long the oldest has waited."""
        awaiting = self._awaiting
        if not awaiting:
            return 0, 0.0
        return len(awaiting), self._clock() - next(iter(awaiting.values()))

    def drain_ttfts(self) -> list[float]:
        """TTFTs recorded since the last call."""
        ttft, self._ttft = self._ttft, []
        return ttft


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
    #: real-time TTFTs (gateway to first bytes) of streams whose first bytes came since the
    #: previous tick (wall seconds)
    rt_ttft: tuple[float, ...] = ()
    rt_awaiting: int = 0  # real-time streams still waiting for their first bytes
    rt_waited: float = 0.0  # seconds the oldest of those has waited so far
    engine: EngineLoad | None = None  # None: the upstream serves no metrics
