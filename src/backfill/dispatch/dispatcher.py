"""`Dispatcher`: one per model; runs requests through its engine inside a concurrency window,
with retries.

- The window (`Window`) bounds how many requests are at the engine at once. Its limit starts at
  the model's `max_concurrency` and can be moved at runtime with `set_limit(n)`; the adaptive
  governor will drive it from load signals (latency, 429/503, upstream queue metrics).
- A slot is held only while a request is at the engine. Backoff sleeps happen outside the
  window, so a burst of 429s does not fill the window with sleepers and starve fresh requests.
- The retry policy (`backfill.domain.retry`) decides what is retried and how long to wait; the
  dispatcher supplies the randomness and the sleeping (both injectable, for fast tests).
- The result is an `Outcome`, always: an HTTP answer (including a final 4xx/5xx after retries
  ran out, whose body goes to the error file as it came) or a transport error with a code for
  the error file (`upstream_unavailable`, `request_timeout`) when no attempt produced an answer.
  Exceptions that are not engine failures (bugs, cancellation) propagate.
- A 2xx answer must be a JSON object: an empty, truncated, HTML or array body is a failed
  attempt, retried like a 5xx; when the attempts run out the outcome is an error with code
  `invalid_upstream_response`, never a success. A good answer's parsed body travels in the
  `Outcome` (`parsed`) so the worker does not parse it twice.
- Stopping (`run(..., stopped=...)`): the caller's predicate is checked right before each
  attempt goes to the engine; once it is true the request is not sent (again) and the outcome
  says so (`Outcome.sent` is False). That is how a cancelled or expired batch stops sending at
  once while the requests already at the engine may finish.
- Counters are plain ints on `DispatchStats`; the metrics endpoint reads them as they are.
- Priority: for upstreams that accept vLLM's `priority` field (`ModelConfig.priority`), every
  batch request is sent with `priority` (the `batch_priority` setting; lower runs first), so
  real-time requests sent by the gateway at a lower number are admitted first.
- Shedding: `shed(n)` aborts the `n` most recently started requests at the engine (the least
  work lost). They are not failures and do not use up an attempt: each goes back to wait for a
  slot and is sent again. The governor sheds when real-time load jumps, because the engine
  never preempts running requests for waiting ones and every step is shared, so only fewer
  batch sequences at the engine lower real-time per-token latency at once. Re-sending is cheap
  with a prefix cache (the prompt's blocks usually still are cached).
- Prefill pacing (`set_pacing`, driven by the governor while real-time traffic is active): a
  request holding a window slot waits at a small gate until `Admission`'s token bucket over
  estimated prompt tokens (`estimate_prompt_tokens`: characters/4 or words) lets it go; among
  those waiting, the oldest that fits goes first, so short prompts slip past a long one. The
  gate sits after the window on purpose: requests never pile up between the two and then go
  in one lump when the limit rises.
- Long prompts last (`set_defer(n)`, driven by the governor while real-time traffic is
  active): a request whose estimated prompt exceeds `n` tokens waits *before* the window (it
  holds no slot) until deferral is turned off, or until the window has room and no other
  request is waiting for it, so it never starves: it only lets the short ones go first. One
  long prompt is a compute-bound prefill of its own (a 2,000-token prompt adds ~70 ms to the
  step on an 8B model on an H100), and every real-time token in that step waits for it; short
  ones fill the steps' spare compute instead. The caller bounds the wait
  (`run(..., defer_until=t)`: a batch's deadline; the worker passes the middle of its
  completion window). `stats.deferred` is how many wait now.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from backfill.dispatch.window import Window
from backfill.domain import exact_json
from backfill.domain.retry import RetryPolicy
from backfill.engines.base import Engine, EngineReply
from backfill.errors import EngineError, EngineUnavailable
from backfill.settings import ModelConfig

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one request after all its attempts.

    Either an answer (`status` set, `body` is the upstream's raw JSON) or a transport error
    (`status is None`, `error_code` and `message` set, `body` empty).
    """

    status: int | None
    body: bytes = b""
    request_id: str | None = None
    error_code: str | None = None
    message: str | None = None
    attempts: int = 1
    #: a 2xx answer's body, parsed (a dict); None for other outcomes. Derived from `body`,
    #: so not compared
    parsed: Any = field(default=None, compare=False)
    #: False when the caller's `stopped` predicate held the request back: no outcome at all
    sent: bool = True

    @classmethod
    def from_reply(cls, reply: EngineReply, attempts: int, parsed: Any = None) -> Outcome:
        return cls(reply.status, reply.body, reply.request_id, attempts=attempts, parsed=parsed)

    @classmethod
    def failure(cls, error_code: str, message: str, attempts: int) -> Outcome:
        return cls(None, b"", None, error_code, message, attempts)

    @classmethod
    def not_sent(cls, attempts: int) -> Outcome:
        return cls(None, attempts=attempts, sent=False)

    @property
    def ok(self) -> bool:
        """A 2xx answer: belongs in the output file."""
        return self.status is not None and 200 <= self.status < 300

    @property
    def is_transport_error(self) -> bool:
        return self.status is None


@dataclass(slots=True)
class DispatchStats:
    """Live counters, plain ints. `in_flight` is requests at the engine right now."""

    in_flight: int = 0
    sent: int = 0  # attempts handed to the engine
    retried: int = 0  # attempts that were retries
    succeeded: int = 0  # requests whose outcome was 2xx
    failed: int = 0  # requests whose outcome was not 2xx (final error status or transport)
    transport_errors: int = 0  # attempts that raised EngineUnavailable
    throttled: int = 0  # answers 429/503 (the upstream says: slow down)
    shed: int = 0  # attempts aborted by `shed()` and sent again later
    deferred: int = 0  # requests waiting now because their prompt is long (`set_defer`)
    bad_bodies: int = 0  # 2xx answers whose body was not a JSON object (failed attempts)


class Admission:
    """Which waiting batch request goes next, and whether one may go now. Pure (no I/O; the
    clock is passed in), shared by the dispatcher and `bench/harvest_sim.py`.

    - `limit`: requests at the engine at once (the governor's concurrency limit).
    - Prefill pacing (`pace`, None = off): a token bucket over the *estimated prompt tokens*
      of the requests sent, refilled at `pace` times the rate that keeps `limit` requests in
      flight in steady state (Little's law over recent answers: limit x mean prompt tokens /
      mean latency), holding at most `burst` tokens. The governor turns it on while
      real-time traffic is active, so batch prefills never land in lumps (after a shed, or
      when the limit rises): a step carrying thousands of prompt tokens is compute-bound and
      long, and every real-time first token and next token in it waits for it.
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


INVALID_UPSTREAM_RESPONSE = "invalid_upstream_response"


def parse_answer(status: int, raw: bytes) -> tuple[Any, str | None]:
    """A 2xx answer's body parsed, or why it is not a usable answer (not a JSON object)."""
    if not raw.strip():
        return None, f"upstream answered {status} with an empty body"
    try:
        parsed = exact_json.loads(raw)
    except orjson.JSONDecodeError as exc:
        return None, (
            f"upstream answered {status} with a body that is not valid JSON "
            f"({len(raw)} bytes: {exc})"
        )
    if not isinstance(parsed, dict):
        return None, (
            f"upstream answered {status} with JSON that is not an object "
            f"(a {type(parsed).__name__})"
        )
    return parsed, None


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


class Dispatcher:
    def __init__(
        self,
        engine: Engine,
        *,
        max_concurrency: int,
        policy: RetryPolicy,
        timeout: float | None = None,
        sleep: Sleep = asyncio.sleep,
        rand: Callable[[], float] = random.random,
        priority: int | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.policy = policy
        self.timeout = timeout
        self.priority = priority
        self.max_concurrency = max_concurrency
        self.stats = DispatchStats()
        self._window = Window(max_concurrency)
        self._sleep = sleep
        self._rand = rand
        #: tasks whose request is at the engine right now, oldest first (dicts keep order)
        self._active: dict[asyncio.Task[Any], None] = {}
        self._shed: set[asyncio.Task[Any]] = set()
        self.admission = Admission(max_concurrency)
        self._gate: list[tuple[int, asyncio.Future[None]]] = []  # holding a slot, paced
        self._pump_handle: asyncio.TimerHandle | None = None
        self._clock = time.monotonic
        self.defer_over: float | None = None
        #: set by a governor that may defer long prompts: the worker then keeps twice
        #: `max_concurrency` requests in hand, so that deferred ones leave the short ones a
        #: full window
        self.may_defer = False
        #: deferred requests, oldest first: (prompt tokens, until when at most (epoch s), future);
        #: a future's result is True when it was let go for the window's room, which it then
        #: holds until it reaches the window (`_leaving`)
        self._parked: list[tuple[int, float, asyncio.Future[bool]]] = []
        self._wall = wall  # epoch seconds, for `defer_until`
        self._leaving = 0

    @classmethod
    def from_config(
        cls,
        engine: Engine,
        config: ModelConfig,
        *,
        base_delay: float = 0.5,
        max_delay: float = 30.0,
        sleep: Sleep = asyncio.sleep,
        priority: int | None = None,
    ) -> Dispatcher:
        """`priority` is sent only when the model's upstream accepts it (`config.priority`)."""
        policy = RetryPolicy(attempts=config.attempts, base_delay=base_delay, max_delay=max_delay)
        return cls(
            engine,
            max_concurrency=config.max_concurrency,
            policy=policy,
            sleep=sleep,
            priority=priority if config.priority else None,
        )

    @property
    def limit(self) -> int:
        return self._window.limit

    @property
    def in_flight(self) -> int:
        return self._window.in_flight

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot in the window (not counting deferred ones)."""
        return self._window.waiting

    def set_limit(self, n: int) -> None:
        """Move the concurrency limit (>= 1). Running requests are never interrupted."""
        self._window.set_limit(n)
        self._unpark()

    def set_pacing(self, pace: float | None, burst: float = 1024.0) -> None:
        """Pace batch prefills (see `Admission`; None turns pacing off and lets everyone
        waiting at the gate go)."""
        self.admission.configure(self._window.limit, pace, burst)
        self._pump()

    def set_defer(self, over: float | None) -> None:
        """Requests with more estimated prompt tokens than `over` go only when nothing else
        waits for the window (None: no deferral; everyone parked goes)."""
        self.defer_over = over
        self._unpark()

    def _unpark(self) -> None:
        """Let parked requests go: all that are no longer long (or all, deferral off) or whose
        time is up, then the oldest one whenever the window has room nobody else waits for."""
        parked = self._parked
        if not parked:
            return
        over = self.defer_over
        now = self._wall()
        keep: list[tuple[int, float, asyncio.Future[bool]]] = []
        for entry in parked:
            tokens, until, future = entry
            if future.done():
                continue
            if over is None or tokens <= over or now >= until:
                future.set_result(False)
            else:
                keep.append(entry)
        window = self._window
        while keep and window.in_flight + self._leaving < window.limit and not window.waiting:
            keep.pop(0)[2].set_result(True)
            self._leaving += 1
        parked[:] = keep
        self.stats.deferred = len(keep)

    async def _deferred(self, tokens: int, until: float) -> None:
        """Wait, outside the window, while this request's prompt counts as long (at most until
        `until`, epoch seconds)."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._parked.append((tokens, until, future))
        self._unpark()
        try:
            await future
        finally:
            if not future.done():
                future.cancel()
            if future.cancelled():
                self._unpark()  # drops it (and recounts)
            elif future.result():
                self._leaving -= 1  # at the window now (or cancelled on the way)

    def _pump(self) -> None:
        """Let requests holding a slot through the prefill gate while the bucket allows."""
        gate = self._gate
        admission = self.admission
        admission.limit = self._window.limit
        while gate:
            gate[:] = [(t, f) for t, f in gate if not f.done()]
            if not gate:
                break
            tokens = [t for t, _ in gate]
            index = admission.pick(tokens, 0, self._clock())
            if index is None:
                wait = admission.wait_time(tokens)
                if self._pump_handle is None and wait is not None:
                    loop = asyncio.get_running_loop()
                    self._pump_handle = loop.call_later(max(wait, 0.002), self._pumped)
                break
            need, future = gate.pop(index)
            admission.sent(need)
            future.set_result(None)

    def _pumped(self) -> None:
        self._pump_handle = None
        self._pump()

    async def _paced(self, tokens: int) -> None:
        """Wait (holding a window slot) until the prefill pacing lets this request go."""
        admission = self.admission
        if admission.rate is None and not self._gate:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._gate.append((tokens, future))
        self._pump()
        try:
            await future
        finally:
            if not future.done():
                future.cancel()

    def is_sending(self, task: asyncio.Task[Any]) -> bool:
        """Whether `task`'s request holds a window slot now (at the engine, or at the pacing
        gate just before it). A cancel lets these finish and stops all others at once."""
        return task in self._active

    def shed(self, n: int) -> int:
        """Abort up to `n` of the most recently started sends; they are sent again once a slot
        is free (not failures, no attempt used). Returns how many were aborted."""
        count = 0
        for task in reversed(list(self._active)):
            if count >= n:
                break
            if task.done() or task in self._shed or task.cancelling():
                continue
            self._shed.add(task)
            task.cancel("shed by the governor")
            count += 1
        return count

    async def run(
        self,
        endpoint: str,
        body: dict[str, Any],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (a per-request budget, passed to the engine)
        defer_until: float = math.inf,
        stopped: Callable[[], bool] | None = None,
    ) -> Outcome:
        """Send one request, retrying per the policy; always returns an `Outcome`.
        `defer_until` (epoch seconds): wait behind shorter prompts at most until then (see
        `set_defer`; a time past: never). `stopped`: checked right before each attempt goes to
        the engine; once true, nothing more is sent (`Outcome.sent` is False)."""
        policy = self.policy
        stats = self.stats
        window = self._window
        per_call = self.timeout if timeout is None else timeout
        if self.priority is not None:
            body = {**body, "priority": self.priority}
        active = self._active
        shed = self._shed
        current = asyncio.current_task()
        tokens = estimate_prompt_tokens(body)
        attempt = 0
        while True:
            attempt += 1
            over = self.defer_over
            if over is not None and tokens > over and self._wall() < defer_until:
                await self._deferred(tokens, defer_until)
            await window.acquire()
            stats.in_flight += 1
            stats.sent += 1
            if attempt > 1:
                stats.retried += 1
            if current is not None:
                active[current] = None
            try:
                try:
                    await self._paced(tokens)
                    if stopped is not None and stopped():
                        stats.sent -= 1  # counted above, never went
                        stats.retried -= attempt > 1
                        return Outcome.not_sent(attempt - 1)
                    sent_at = self._clock()
                    reply = await self.engine.send(endpoint, body, timeout=per_call)
                    self.admission.answered(tokens, self._clock() - sent_at)
                finally:
                    if current is not None:
                        del active[current]
            except asyncio.CancelledError:
                if current is None or current not in shed:
                    raise
                shed.discard(current)
                if current.cancelling() != 1:
                    raise  # also cancelled by someone else (batch cancel, shutdown): give up
                current.uncancel()
                stats.shed += 1
                attempt -= 1  # shedding is ours, not the request's fault
                wait = 0.0
            except EngineUnavailable as exc:
                stats.transport_errors += 1
                if attempt >= policy.attempts:
                    stats.failed += 1
                    return Outcome.failure(exc.code or "upstream_unavailable", exc.message, attempt)
                wait = policy.delay(attempt, None, self._rand())
            except EngineError as exc:  # the engine says retrying will not help
                stats.failed += 1
                return Outcome.failure(exc.code or "upstream_error", exc.message, attempt)
            else:
                if shed and current in shed:  # shed just as the answer came: keep the answer
                    shed.discard(current)
                status = reply.status
                if status == 429 or status == 503:
                    stats.throttled += 1
                if 200 <= status < 300:
                    parsed, problem = parse_answer(status, reply.body)
                    if problem is None:
                        stats.succeeded += 1
                        return Outcome.from_reply(reply, attempt, parsed)
                    stats.bad_bodies += 1
                    if attempt >= policy.attempts:
                        stats.failed += 1
                        return Outcome.failure(INVALID_UPSTREAM_RESPONSE, problem, attempt)
                    wait = policy.delay(attempt, None, self._rand())
                elif not policy.can_retry(attempt, status):
                    stats.failed += 1
                    return Outcome.from_reply(reply, attempt)
                else:
                    wait = policy.delay(attempt, reply.retry_after, self._rand())
            finally:
                stats.in_flight -= 1
                window.release()
                if self._parked:
                    self._unpark()
            if wait > 0:
                await self._sleep(wait)
