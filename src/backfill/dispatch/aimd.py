"""`AimdPolicy`: the admission baseline the governor is measured against (`docs/governor.md`).

What llm-d's and AIBrix's admission control do, reduced to the batch limit: additive increase
(`increase` requests per tick) while the real-time p99 TTFT and TPOT over the last `window`
seconds are inside their targets, multiplicative decrease (x `decrease`) on a breach or on a
429/503 answer, then `cooldown` seconds without another change, so that the next verdict is on
latencies measured under the new limit (a p99 lags the limit by the requests still in flight).
No model of the engine, no reference peak, no pacing, no deferral and, by default, no shedding:
admission control only gates what is sent next; what is in flight finishes.

The targets are absolute (seconds, as the gateway measures them): a p99 measured "inside the
budget" needs one, and the governor's budget is relative to real time alone, which nothing in
a running system measures. The benches give it the budget x the p99 of real time alone measured
on the same trace, which is more than a deployment knows; `governor_policy = "aimd"` takes them
from `governor_aimd_ttft_ms` / `governor_aimd_tpot_ms`.

Same interface as `GovernorPolicy`: `decide(signals) -> Decision`, no I/O, no clock; the
`Governor` and the benches swap one for the other.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from backfill.dispatch.policy import Decision
from backfill.dispatch.signals import Signals


@dataclass(frozen=True, slots=True)
class AimdConfig:
    ceiling: int
    ttft_target: float  # seconds: real-time p99 TTFT must stay at or below this
    tpot_target: float  # seconds: real-time p99 TPOT must stay at or below this
    floor: int = 1
    start: int | None = None  # the first limit (None: the floor)
    increase: float = 1.0  # requests added per tick while inside the targets
    decrease: float = 0.5  # the limit is multiplied by this on a breach or a 429/503
    window: float = 10.0  # seconds of real-time samples behind the p99
    cooldown: float = 2.0  # seconds after a decrease before the next change
    quantile: float = 0.99
    abort: bool = False  # shed the batch requests over a decreased limit


def quantile(values: deque[tuple[float, float]], q: float) -> float:
    ordered = sorted(v for _, v in values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class AimdPolicy:
    def __init__(self, config: AimdConfig) -> None:
        self.config = config
        self._level = float(min(config.ceiling, max(config.floor, config.start or config.floor)))
        self._ttft: deque[tuple[float, float]] = deque()
        self._tpot: deque[tuple[float, float]] = deque()
        self._hold_until = -math.inf
        self.dormant = False  # (the `Governor` reads it from either policy)

    @property
    def limit(self) -> int:
        return int(self._level)

    def p99(self, now: float) -> tuple[float | None, float | None]:
        """The real-time TTFT and TPOT quantiles over the window (None: no sample in it)."""
        horizon = now - self.config.window
        out: list[float | None] = []
        for samples in (self._ttft, self._tpot):
            while samples and samples[0][0] < horizon:
                samples.popleft()
            out.append(quantile(samples, self.config.quantile) if samples else None)
        return out[0], out[1]

    def breached(self, now: float) -> bool:
        ttft, tpot = self.p99(now)
        c = self.config
        return (ttft is not None and ttft > c.ttft_target) or (
            tpot is not None and tpot > c.tpot_target
        )

    def decide(self, s: Signals) -> Decision:
        c = self.config
        self._ttft.extend((s.now, x) for x in s.rt_ttft)
        # a stream still waiting for its first bytes counts as a TTFT of at least that long
        if s.rt_awaiting > 0:
            self._ttft.append((s.now, s.rt_waited))
        self._tpot.extend((s.now, x) for x in s.rt_tpot)
        shed = 0
        if s.now >= self._hold_until:
            if s.batch_throttled > 0 or self.breached(s.now):
                self._level = float(max(c.floor, math.floor(self._level * c.decrease)))
                self._hold_until = s.now + c.cooldown
                # the verdict after the cooldown is on samples measured under the new limit
                self._ttft.clear()
                self._tpot.clear()
                if c.abort:
                    shed = max(0, s.batch_in_flight - self.limit)
            elif s.batch_in_flight >= self.limit - max(1.0, c.increase):
                # grow only a limit that is used (else it climbs while the batch is short)
                self._level = min(float(c.ceiling), self._level + c.increase)
        ttft, tpot = self.p99(s.now)
        return Decision(
            self.limit,
            shed,
            burst=0.0,
            target_total=float(self.limit),
            idle=ttft is None and tpot is None,
        )
