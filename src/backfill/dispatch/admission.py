"""`Admission`: which waiting batch request goes to the engine next, and whether one may go now.

Pure (no I/O, the clock is passed in), so the dispatcher's pacing gate (`pacing.py`) and
`bench/harvest_sim.py` run the same code. Why pace at all: one engine step carrying thousands
of batch prompt tokens is compute-bound and long, and every real-time first token and next
token in that step waits for it. Measurements: `docs/governor.md`.
"""

from __future__ import annotations

from typing import Any


class Admission:
    """- `limit`: requests at the engine at once (the governor's concurrency limit).
    - Prefill pacing (`pace`, None = off): a token bucket over the *estimated prompt tokens*
      of the requests sent, refilled at `pace` times the rate that keeps `limit` requests in
      flight in steady state (Little's law over recent answers: limit x mean prompt tokens /
      mean latency), holding at most `burst` tokens, so batch prefills never land in lumps
      (after a shed, or when the limit rises).
    - Order: the oldest waiter that fits the bucket goes first, looking at most `lookahead`
      waiters deep; a prompt larger than the whole burst goes only when the bucket is full
      (never starved; the bucket then runs into debt and refills).
    """

    def __init__(self, limit: int, *, lookahead: int = 64, memory: float = 0.02) -> None:
        self.limit = limit
        self.lookahead = lookahead
        self.memory = memory  # weight of each answer in the running means
        self.pace: float | None = None
        self.burst = 0.0
        self.mean_tokens = 0.0
        self.mean_latency = 0.0
        self._bucket = 0.0
        self._at: float | None = None

    @property
    def rate(self) -> float | None:
        """Prompt tokens per second the bucket lets through (None: unlimited)."""
        if self.pace is None or self.mean_latency <= 0:
            return None
        return self.pace * max(1, self.limit) * self.mean_tokens / self.mean_latency

    def configure(self, limit: int, pace: float | None, burst: float) -> None:
        if pace is not None and self.pace is None:
            self._bucket = burst  # from unlimited: start full
        self.limit = limit
        self.pace = pace
        self.burst = burst
        self._bucket = min(self._bucket, burst)

    def answered(self, tokens: int, latency: float) -> None:
        """A request sent with these estimated prompt tokens was answered after `latency` s."""
        if self.mean_latency <= 0:
            self.mean_tokens, self.mean_latency = float(tokens), latency
            return
        w = self.memory
        self.mean_tokens += w * (tokens - self.mean_tokens)
        self.mean_latency += w * (latency - self.mean_latency)

    def _refill(self, now: float) -> None:
        rate = self.rate
        if self._at is not None and rate is not None:
            self._bucket = min(self.burst, self._bucket + (now - self._at) * rate)
        self._at = now

    def pick(self, tokens: list[int], in_flight: int, now: float) -> int | None:
        """Index (into `tokens`, the waiters' estimated prompt tokens, oldest first) of the
        request to send now, or None to wait."""
        if not tokens or in_flight >= self.limit:
            return None
        self._refill(now)
        if self.rate is None:
            return 0
        bucket = self._bucket
        for index, need in enumerate(tokens[: self.lookahead]):
            if need <= bucket:
                return index
        if bucket >= self.burst and tokens[0] > self.burst:
            return 0
        return None

    def sent(self, tokens: int) -> None:
        if self.rate is not None:
            self._bucket -= tokens

    def wait_time(self, tokens: list[int]) -> float | None:
        """Seconds until the bucket may let one of these through (None: no pacing)."""
        rate = self.rate
        if rate is None or not tokens:
            return None
        need = min(min(tokens[: self.lookahead]), self.burst)
        return max(0.0, (need - self._bucket) / rate)


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """A cheap estimate of a request's prompt tokens from its body: the larger of characters/4
    and words over its text (messages' content, prompt or input), at least 1."""
    parts: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, dict):
            walk(value.get("content") if "content" in value else value.get("text"))

    if "messages" in body:
        walk(body["messages"])
    else:
        walk(body.get("prompt", body.get("input")))
    chars = sum(len(p) for p in parts)
    words = sum(p.count(" ") + 1 for p in parts if p)
    return max(1, chars // 4, words)
