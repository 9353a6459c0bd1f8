"""`Dispatcher`: one per model; runs requests through its engine inside a concurrency window,
with retries, and always gives an `Outcome`.

- The window (`Window`) bounds the requests at the engine at once. A slot is held only while a
  request is at the engine (or at the pacing gate just before it): backoff sleeps happen
  outside it, so a burst of 429s does not fill the window with sleepers.
- Retries: `backfill.domain.retry` decides what is retried and how long to wait; the
  dispatcher supplies the randomness and the sleeping (both injectable, for fast tests). A 2xx
  must be a JSON object: any other body is a failed attempt, retried like a 5xx, and in the
  end `invalid_upstream_response`, never a success. A good answer's parsed body travels in
  the `Outcome`, so the worker does not parse it twice. Exceptions that are not engine
  failures (bugs, cancellation) propagate.
- Stopping: the caller's `stopped` predicate is checked right before each attempt goes to the
  engine; once true nothing more is sent (`Outcome.sent` is False). That is how a cancelled
  batch stops sending at once while requests already at the engine may finish.
- Shedding (`shed(n)`) aborts the most recently started requests (the least work lost); they
  are not failures and use up no attempt: each waits for a slot again. Only fewer batch
  sequences at the engine lower real-time per-token latency at once (the engine never
  preempts running requests), and a prefix cache makes the re-send cheap.
- A governor moves all of this through one call, `apply(decision)`: the limit, prefill pacing
  (`pacing.py`), long-prompt deferral (`deferral.py`) and shedding.
- Priority: for upstreams that accept vLLM's `priority` (`ModelConfig.priority`), every batch
  request carries `batch_priority`, so real-time requests at a lower number go first.
- Prefix groups (`group`, from `domain/planning.py`; `hot_groups.py` has the reasoning):
  with `hot_groups` on, a freed slot goes to the oldest waiter whose group is at the engine now
  or just finished, within an aging bound (shards of this model that drifted apart meet on the
  same prefix again); and a group not seen lately sends one request first and holds its others
  before the window (`warmup.py`) until that one ends or has been at the engine for
  `warmup_seconds`, so they hit the prefix it put in the engine's cache instead of all
  computing it at once. Both need planning on (without it requests carry no group) and change
  nothing for requests without one; `hot_groups=False` is the first-come-first-served window.
- Counters are plain ints on `DispatchStats`; the metrics endpoint reads them as they are.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from backfill.dispatch.admission import estimate_prompt_tokens
from backfill.dispatch.dedup import Dedup
from backfill.dispatch.deferral import Deferral
from backfill.dispatch.hot_groups import HotGroups, real_group
from backfill.dispatch.pacing import PacingGate
from backfill.dispatch.policy import Decision
from backfill.dispatch.warmup import WARMUP_SECONDS, Lead, WarmUpGate
from backfill.dispatch.window import Window
from backfill.domain import exact_json
from backfill.domain.duplicates import body_key, may_share
from backfill.domain.retry import RetryPolicy
from backfill.engines.base import Engine, EngineReply
from backfill.errors import EngineError, EngineUnavailable
from backfill.settings import ModelConfig

Sleep = Callable[[float], Awaitable[None]]


@dataclass(slots=True)
class _EngineTime:
    """Seconds one request has spent at the engine so far (every attempt, answered or not)."""

    seconds: float = 0.0


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
    #: seconds the request spent at the engine, over all its attempts (the usage ledger's
    #: engine time): from handing it to the engine to its answer or failure
    engine_seconds: float = field(default=0.0, compare=False)

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
    requests: int = 0  # requests asked of the dispatcher (input lines)
    shared: int = 0  # of those, answered by an identical request's call (`dedup.py`)
    held: int = 0  # requests that waited for their cold prefix group's first (`warmup.py`)


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
        dedup: str = "off",
        hot_groups: bool = False,
        warmup_seconds: float = WARMUP_SECONDS,
    ) -> None:
        self.engine = engine
        self.policy = policy
        self.timeout = timeout
        self.priority = priority
        self.max_concurrency = max_concurrency
        self.stats = DispatchStats()
        #: prefix groups at the engine and just finished (None: first come first served)
        self.hot = HotGroups() if hot_groups else None
        self._window = Window(max_concurrency, self.hot)
        self._warmup = (
            WarmUpGate(self.hot, warmup_seconds, self._count_held) if self.hot is not None else None
        )
        self._sleep = sleep
        self._rand = rand
        self._clock = time.monotonic
        #: tasks whose request holds a window slot now, oldest first (dicts keep order)
        self._active: dict[asyncio.Task[Any], None] = {}
        self._shed: set[asyncio.Task[Any]] = set()
        self._pacing = PacingGate(self._window, self._clock)
        self._deferral = Deferral(self._window, wall, self._count_deferred)
        #: identical requests run once (`domain/duplicates.py`: "deterministic", "all", "off")
        self.dedup_mode = dedup
        self.dedup = Dedup()

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
            dedup=config.dedup,
            hot_groups=config.hot_groups,
            warmup_seconds=config.warmup_seconds,
        )

    # -- state --------------------------------------------------------------------------------
    @property
    def limit(self) -> int:
        return self._window.limit

    @property
    def in_flight(self) -> int:
        return self._window.in_flight

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot in the window, or before it for their prefix group's
        first request (`warmup.py`); not counting deferred ones."""
        held = self._warmup.held if self._warmup is not None else 0
        return self._window.waiting + held

    @property
    def defer_over(self) -> float | None:
        """Prompts with more estimated tokens wait behind shorter ones (None: none wait)."""
        return self._deferral.over

    def in_hand(self) -> int:
        """How many requests a worker should keep started for this model: the configured
        ceiling (a governor may raise the limit up to it later), at least 16; twice that once
        long prompts may be deferred, so that those waiting leave the short ones a full
        window."""
        n = max(16, self.max_concurrency)
        return 2 * n if self._deferral.may_defer else n

    def is_sending(self, task: asyncio.Task[Any]) -> bool:
        """Whether `task`'s request holds a window slot now (at the engine, or at the pacing
        gate just before it). A cancel lets these finish and stops all others at once."""
        return task in self._active

    # -- control ------------------------------------------------------------------------------
    def apply(self, decision: Decision) -> None:
        """A governor's decision, all at once: limit, prefill pacing, deferral, shedding."""
        if decision.limit != self.limit:
            self.set_limit(decision.limit)
        self.set_pacing(decision.pace, decision.burst)
        if decision.defer_over != self.defer_over:
            self.set_defer(decision.defer_over)
        if decision.shed > 0:
            self.shed(decision.shed)

    def set_limit(self, n: int) -> None:
        """Move the concurrency limit (>= 1). Running requests are never interrupted."""
        self._window.set_limit(n)
        self._deferral.unpark()

    def set_pacing(self, pace: float | None, burst: float = 1024.0) -> None:
        """Pace batch prefills (see `Admission`; None turns pacing off and lets everyone
        waiting at the gate go)."""
        self._pacing.configure(pace, burst)

    def set_defer(self, over: float | None) -> None:
        """Requests with more estimated prompt tokens than `over` go only when nothing else
        waits for the window (None: no deferral; everyone parked goes)."""
        self._deferral.set_over(over)

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

    def _count_deferred(self, n: int) -> None:
        self.stats.deferred = n

    def _count_held(self) -> None:
        self.stats.held += 1

    # -- one request --------------------------------------------------------------------------
    async def run(
        self,
        endpoint: str,
        body: dict[str, Any],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (a per-request budget, passed to the engine)
        defer_until: float = math.inf,
        stopped: Callable[[], bool] | None = None,
        group: bytes | None = None,
        scope: str = "",
    ) -> Outcome:
        """Send one request, retrying per the policy; always returns an `Outcome`.
        `defer_until` (epoch seconds): wait behind shorter prompts at most until then (see
        `set_defer`; a time past: never). `stopped`: checked right before each attempt goes to
        the engine; once true, nothing more is sent (`Outcome.sent` is False). Identical
        requests (per `dedup`) share one call: see `dispatch/dedup.py`; only within one `scope`
        (the batch's project): another project's identical request never shares an answer, so
        no tenant can tell by timing what another one asked, and each project's engine time is
        its own."""
        self.stats.requests += 1
        if may_share(self.dedup_mode, endpoint, body):
            key = scope.encode() + b"\x00" + body_key(endpoint, body)
            outcome, shared = await self.dedup.run(
                key,
                lambda: self._run(endpoint, body, timeout, defer_until, stopped, group),
            )
            self.stats.shared += shared
            return outcome
        return await self._run(endpoint, body, timeout, defer_until, stopped, group)

    async def _run(
        self,
        endpoint: str,
        body: dict[str, Any],
        timeout: float | None,  # noqa: ASYNC109 (a per-request budget, passed to the engine)
        defer_until: float,
        stopped: Callable[[], bool] | None,
        group: bytes | None,
    ) -> Outcome:
        if self.priority is not None:
            body = {**body, "priority": self.priority}
        per_call = self.timeout if timeout is None else timeout
        tokens = estimate_prompt_tokens(body)
        group = real_group(group) if self.hot is not None else None
        lead: Lead | None = None
        if self._warmup is not None:
            lead = await self._warmup.enter(group)
        try:
            return await self._attempts(
                endpoint, body, tokens, per_call, defer_until, stopped, group, lead
            )
        finally:
            if lead is not None and self._warmup is not None:
                self._warmup.release(lead)  # however it ended: its group goes now

    async def _attempts(
        self,
        endpoint: str,
        body: dict[str, Any],
        tokens: int,
        per_call: float | None,
        defer_until: float,
        stopped: Callable[[], bool] | None,
        group: bytes | None,
        lead: Lead | None,
    ) -> Outcome:
        current = asyncio.current_task()
        attempt = 1
        spent = _EngineTime()
        while True:
            await self._deferral.wait(tokens, defer_until)
            try:
                reply = await self._attempt(
                    endpoint, body, tokens, per_call, attempt, stopped, spent, group, lead
                )
            except asyncio.CancelledError:
                if not self._resend_shed(current):
                    raise
                continue  # the same attempt again, at once
            except EngineUnavailable as exc:
                verdict = self._unavailable(exc, attempt)
            except EngineError as exc:  # the engine says retrying will not help
                self.stats.failed += 1
                failure = Outcome.failure(exc.code or "upstream_error", exc.message, attempt)
                return replace(failure, engine_seconds=spent.seconds)
            else:
                if reply is None:
                    return replace(Outcome.not_sent(attempt - 1), engine_seconds=spent.seconds)
                verdict = self._answered(reply, attempt)
            if isinstance(verdict, Outcome):
                return replace(verdict, engine_seconds=spent.seconds)
            if verdict > 0:
                await self._sleep(verdict)
            attempt += 1

    async def _attempt(
        self,
        endpoint: str,
        body: dict[str, Any],
        tokens: int,
        timeout: float | None,  # noqa: ASYNC109 (a per-request budget, passed to the engine)
        attempt: int,
        stopped: Callable[[], bool] | None,
        spent: _EngineTime,
        group: bytes | None = None,
        lead: Lead | None = None,
    ) -> EngineReply | None:
        """One attempt holding a window slot: the pacing gate, then `stopped` (checked right
        before the engine), then the engine. None: stopped, not sent. The group counts as
        running (hot) while the slot is held, and as just finished from its release on."""
        stats = self.stats
        hot = self.hot
        await self._window.acquire(group)
        if hot is not None:
            hot.started(group)
        stats.in_flight += 1
        stats.sent += 1
        if attempt > 1:
            stats.retried += 1
        current = asyncio.current_task()
        if current is not None:
            self._active[current] = None
        try:
            await self._pacing.wait(tokens)
            if stopped is not None and stopped():
                stats.sent -= 1  # counted above, never went
                stats.retried -= attempt > 1
                return None
            if lead is not None and self._warmup is not None:
                self._warmup.arm(lead)
            sent_at = self._clock()
            try:
                reply = await self.engine.send(endpoint, body, timeout=timeout)
            finally:
                spent.seconds += self._clock() - sent_at
            self._pacing.answered(tokens, self._clock() - sent_at)
        finally:
            if current is not None:
                del self._active[current]
            stats.in_flight -= 1
            if hot is not None:
                hot.ended(group)  # before the release: the freed slot may go to this group
            self._window.release()
            if self._deferral.parked:
                self._deferral.unpark()
        if current in self._shed:  # shed just as the answer came: keep the answer
            self._shed.discard(current)
        return reply

    def _resend_shed(self, task: asyncio.Task[Any] | None) -> bool:
        """After a cancel: whether it was our `shed` alone (then the request goes again)."""
        if task is None or task not in self._shed:
            return False
        self._shed.discard(task)
        if task.cancelling() != 1:
            return False  # also cancelled by someone else (batch cancel, shutdown): give up
        task.uncancel()
        self.stats.shed += 1
        return True

    def _unavailable(self, exc: EngineUnavailable, attempt: int) -> Outcome | float:
        """No answer at all: the final outcome, or seconds to wait before the next attempt."""
        self.stats.transport_errors += 1
        if attempt >= self.policy.attempts:
            self.stats.failed += 1
            return Outcome.failure(exc.code or "upstream_unavailable", exc.message, attempt)
        return self.policy.delay(attempt, None, self._rand())

    def _answered(self, reply: EngineReply, attempt: int) -> Outcome | float:
        """An answer: the final outcome, or seconds to wait before the next attempt."""
        stats = self.stats
        policy = self.policy
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
            return policy.delay(attempt, None, self._rand())
        if not policy.can_retry(attempt, status):
            stats.failed += 1
            return Outcome.from_reply(reply, attempt)
        return policy.delay(attempt, reply.retry_after, self._rand())
