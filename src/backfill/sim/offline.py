"""Run the simulated engine without HTTP and without sleeping: calibration, tests, what-ifs.

    from backfill.sim import Simulator, sharegpt_like
    stats = Simulator("llama-3.1-8b-h100").run_offline(sharegpt_like(1000, seed=0))
    print(stats.total_tokens_per_s, stats.ttft.p50)

Requests carry an `arrival` (simulated seconds); all at 0 is vLLM's offline throughput
benchmark. Between arrivals the clock jumps, so the result is the same as a real-time run at any
speedup, only computed as fast as Python allows.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from backfill.sim.engine import Engine, SimRequest
from backfill.sim.profiles import Profile, get_profile
from backfill.sim.tokens import Prompt

__all__ = [
    "Distribution",
    "OfflineRequest",
    "OfflineStats",
    "Simulator",
    "sharegpt_like",
]


@dataclass(frozen=True, slots=True)
class OfflineRequest:
    """A request for `run_offline`: a prompt (or just its length) and an output length."""

    prompt: Prompt | int
    max_tokens: int
    priority: int = 0
    arrival: float = 0.0
    key: Hashable = None  # makes a synthetic prompt unique; None: the request's index


@dataclass(frozen=True, slots=True)
class Distribution:
    """Summary of a list of simulated durations (seconds)."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution:
        if not values:
            return cls(0, 0.0, 0.0, 0.0, 0.0, 0.0)
        ordered = sorted(values)

        def pct(q: float) -> float:
            return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]

        return cls(
            len(ordered), sum(ordered) / len(ordered), pct(0.5), pct(0.9), pct(0.99), ordered[-1]
        )


@dataclass(slots=True)
class OfflineStats:
    """Result of `run_offline`: throughput over the simulated duration, latency summaries."""

    duration_s: float
    requests: int
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int
    preemptions: int
    steps: int
    ttft: Distribution
    tpot: Distribution
    e2e: Distribution
    queue: Distribution
    finished: list[SimRequest] = field(repr=False, default_factory=list)

    @property
    def total_tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.duration_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.duration_s

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.duration_s

    def summary(self) -> dict[str, Any]:
        return {
            "duration_s": self.duration_s,
            "requests": self.requests,
            "requests_per_s": self.requests_per_s,
            "total_tokens_per_s": self.total_tokens_per_s,
            "output_tokens_per_s": self.output_tokens_per_s,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "cached_tokens": self.cached_tokens,
            "preemptions": self.preemptions,
            "steps": self.steps,
            "ttft_p50_s": self.ttft.p50,
            "ttft_p99_s": self.ttft.p99,
            "tpot_p50_s": self.tpot.p50,
            "tpot_p99_s": self.tpot.p99,
        }


class Simulator:
    """One simulated deployment: a profile and a fresh engine per run."""

    def __init__(self, profile: Profile | str, **overrides: Any) -> None:
        if isinstance(profile, str):
            profile = get_profile(profile, **overrides)
        elif overrides:
            import dataclasses

            profile = dataclasses.replace(profile, **overrides)
        self.profile = profile

    def engine(self) -> Engine:
        return Engine(self.profile)

    def run_offline(
        self, requests: Iterable[OfflineRequest], *, max_steps: int | None = None
    ) -> OfflineStats:
        """Run every request to completion as fast as possible; return throughput and latency."""
        engine = self.engine()
        block_size = self.profile.block_size
        pending: list[SimRequest] = []
        for index, item in enumerate(requests):
            prompt = item.prompt
            if isinstance(prompt, int):
                key = index if item.key is None else item.key
                prompt = Prompt.synthetic(prompt, key, block_size=block_size)
            pending.append(
                SimRequest(
                    f"offline-{index}",
                    prompt,
                    item.max_tokens,
                    priority=item.priority,
                    arrival=item.arrival,
                )
            )
        pending.sort(key=lambda r: r.arrival)
        start = pending[0].arrival if pending else 0.0
        engine.now = start
        finished: list[SimRequest] = []
        cursor = 0
        steps = 0
        while cursor < len(pending) or engine.has_work():
            while cursor < len(pending) and pending[cursor].arrival <= engine.now:
                engine.add(pending[cursor])
                cursor += 1
            result = engine.step()
            if result is None:
                if cursor < len(pending):
                    engine.now = pending[cursor].arrival
                    continue
                break
            finished.extend(result.finished)
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        metrics = engine.metrics
        timings = [r.timings() for r in finished]
        return OfflineStats(
            duration_s=max(engine.now - start, 1e-12),
            requests=len(finished),
            prompt_tokens=sum(r.prompt_len for r in finished),
            output_tokens=sum(r.num_output for r in finished),
            cached_tokens=sum(max(r.cached_tokens, 0) for r in finished),
            preemptions=metrics.preemptions,
            steps=metrics.steps,
            ttft=Distribution.of([t["ttft_s"] for t in timings]),
            tpot=Distribution.of(
                [t["tpot_s"] for r, t in zip(finished, timings, strict=True) if r.num_output > 1]
            ),
            e2e=Distribution.of([t["e2e_s"] for t in timings]),
            queue=Distribution.of([t["queue_s"] for t in timings]),
            finished=finished,
        )


def _lognormal_lengths(
    rng: random.Random, count: int, mean: float, sigma: float, low: int, high: int
) -> list[int]:
    """Clipped lognormal integers whose mean is `mean` (mu solved, then rescaled once)."""
    if count <= 0:
        return []
    mu = math.log(mean) - sigma * sigma / 2
    raw = [rng.lognormvariate(mu, sigma) for _ in range(count)]
    clipped = [min(high, max(low, x)) for x in raw]
    scale = mean / (sum(clipped) / count)
    return [min(high, max(low, round(x * scale))) for x in clipped]


def sharegpt_like(
    count: int,
    *,
    seed: int = 0,
    mean_prompt: float = 230.0,
    mean_output: float = 190.0,
    prompt_sigma: float = 1.0,
    output_sigma: float = 0.9,
    max_prompt: int = 4096,
    max_output: int = 2048,
    arrival_rate: float | None = None,
) -> list[OfflineRequest]:
    """A ShareGPT-like length mix: clipped lognormal prompt/output lengths with these means.

    ShareGPT as used by vLLM's and SGLang's benchmarks averages about 230 prompt and 190 output
    tokens with long tails; sigma ~1 reproduces a median about 60% of the mean. All requests
    arrive at 0 unless `arrival_rate` (requests per simulated second, Poisson) is given.
    Prompts are unique (no shared prefixes).
    """
    rng = random.Random(seed)
    prompts = _lognormal_lengths(rng, count, mean_prompt, prompt_sigma, 4, max_prompt)
    outputs = _lognormal_lengths(rng, count, mean_output, output_sigma, 1, max_output)
    arrivals = [0.0] * count
    if arrival_rate:
        clock = 0.0
        for index in range(count):
            clock += rng.expovariate(arrival_rate)
            arrivals[index] = clock
    return [
        OfflineRequest(prompt=p, max_tokens=o, arrival=a, key=("sharegpt", seed, i))
        for i, (p, o, a) in enumerate(zip(prompts, outputs, arrivals, strict=True))
    ]
