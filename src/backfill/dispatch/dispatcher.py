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
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from backfill.dispatch.window import Window
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

    @classmethod
    def from_reply(cls, reply: EngineReply, attempts: int) -> Outcome:
        return cls(reply.status, reply.body, reply.request_id, attempts=attempts)

    @classmethod
    def failure(cls, error_code: str, message: str, attempts: int) -> Outcome:
        return cls(None, b"", None, error_code, message, attempts)

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
        #: sends at the engine, oldest first (dicts keep insertion order)
        #: tasks whose request is at the engine right now, oldest first (dicts keep order)
        self._active: dict[asyncio.Task[Any], None] = {}
        self._shed: set[asyncio.Task[Any]] = set()

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

    def set_limit(self, n: int) -> None:
        """Move the concurrency limit (>= 1). Running requests are never interrupted."""
        self._window.set_limit(n)

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
    ) -> Outcome:
        """Send one request, retrying per the policy; always returns an `Outcome`."""
        policy = self.policy
        stats = self.stats
        window = self._window
        per_call = self.timeout if timeout is None else timeout
        if self.priority is not None:
            body = {**body, "priority": self.priority}
        active = self._active
        shed = self._shed
        current = asyncio.current_task()
        attempt = 0
        while True:
            attempt += 1
            await window.acquire()
            stats.in_flight += 1
            stats.sent += 1
            if attempt > 1:
                stats.retried += 1
            if current is not None:
                active[current] = None
            try:
                try:
                    reply = await self.engine.send(endpoint, body, timeout=per_call)
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
                if not policy.can_retry(attempt, status):
                    if 200 <= status < 300:
                        stats.succeeded += 1
                    else:
                        stats.failed += 1
                    return Outcome.from_reply(reply, attempt)
                wait = policy.delay(attempt, reply.retry_after, self._rand())
            finally:
                stats.in_flight -= 1
                window.release()
            if wait > 0:
                await self._sleep(wait)
