"""The webhook deliverer: takes due deliveries from the store's outbox and POSTs them.

Runs in every process that runs the scheduler (`backfill serve`, `backfill worker`); several
at once share the outbox safely, since the store hands each delivery to one of them at a time
(`Store.claim_webhook_deliveries`) and fences each outcome by the claim's token.

- A claim holds a delivery for twice the attempt's timeout plus a margin: a process killed
  mid-attempt leaves it due again when the hold runs out, and another process (or the
  restarted one) tries again, under the same `webhook-id`. So delivery is at least once, and
  a receiver that keeps the ids it has seen gets each event exactly once.
- Any 2xx answer delivers. Anything else (another status, a refused connection, a timeout, a
  redirect: not followed) is a failed attempt, tried again after `RetryPolicy.delay` (5 s
  doubling to an hour by default) until the event is 72 hours old, then given up and logged.
- The body is the exact bytes signed; each attempt is signed at its own time
  (`webhooks/signing.py`).
- Up to `webhook_concurrency` attempts run at once, each a task of its own: a slow receiver
  holds one slot, never the loop.
- Delivered and failed rows older than `webhook_retention_seconds` are deleted now and then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson

from backfill import __version__
from backfill.domain.ids import new_token
from backfill.domain.webhooks import RetryPolicy, WebhookDelivery
from backfill.outages import Outages
from backfill.settings import Settings
from backfill.store.base import Store
from backfill.webhooks.signing import signed_headers

log = logging.getLogger("backfill.webhooks")

#: a claim holds its delivery for twice the attempt's timeout and this long
CLAIM_MARGIN_SECONDS = 5.0
#: an answer's body is read (for the log) up to this many bytes
ERROR_BODY_BYTES = 512
PRUNE_INTERVAL_SECONDS = 3600.0
#: at shutdown, seconds the attempts in flight may take to end and be recorded
SHUTDOWN_GRACE_SECONDS = 5.0


class Deliverer:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._clock = clock
        self._interval = settings.webhook_interval
        self._timeout = settings.webhook_timeout_seconds
        self._slots = max(1, settings.webhook_concurrency)
        self._retention = settings.webhook_retention_seconds
        self.policy = RetryPolicy(
            first_delay=settings.webhook_retry_first_seconds,
            max_delay=settings.webhook_retry_max_seconds,
            give_up_after=settings.webhook_give_up_seconds,
        )
        self._token = "webhooks-" + new_token()[:12]
        self._tasks: set[asyncio.Task[None]] = set()
        self._next_prune = 0.0
        self._outages = Outages(
            log,
            base=settings.webhook_interval,
            cap=settings.outage_backoff_max,
            slack=settings.store_busy_timeout,
            clock=clock,
        )

    async def run(self, stop: asyncio.Event) -> None:
        async with client_session(self._timeout) as session:
            try:
                while not stop.is_set():
                    delay = self._interval
                    try:
                        await self.tick(session)
                        self._outages.succeeded()
                    except Exception as exc:
                        if not self._outages.failed(exc):
                            log.exception("webhook tick failed")
                        delay = self._outages.delay
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
            finally:
                # attempts in flight get a moment to end and be recorded (cancelled at once, a
                # delivery the receiver had already accepted was sent again after a restart);
                # those cut short here are tried again when their claims run out
                if self._tasks:
                    grace = min(self._timeout, SHUTDOWN_GRACE_SECONDS)
                    await asyncio.wait(set(self._tasks), timeout=grace)
                for task in list(self._tasks):
                    task.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)

    async def tick(self, session: aiohttp.ClientSession) -> int:
        """Start attempts for what is due, as many as free slots allow; return how many."""
        now = self._clock()
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_INTERVAL_SECONDS
            await asyncio.to_thread(
                self._store.prune_webhook_deliveries, int(now - self._retention)
            )
        free = self._slots - len(self._tasks)
        if free <= 0:
            return 0
        hold = 2 * self._timeout + CLAIM_MARGIN_SECONDS
        due = await asyncio.to_thread(
            self._store.claim_webhook_deliveries, self._token, now, hold, free
        )
        for delivery in due:
            task = asyncio.create_task(self.attempt(session, delivery))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return len(due)

    async def attempt(self, session: aiohttp.ClientSession, d: WebhookDelivery) -> None:
        status, error = await send(session, d.url, d.secrets, d.event_id, d.body(), self._clock)
        now = self._clock()
        delivered = error is None
        retry_at = None if delivered else self.policy.next_attempt(d.created_at, d.attempts, now)
        try:
            await asyncio.to_thread(
                self._store.finish_webhook_delivery,
                d.id,
                self._token,
                now,
                delivered=delivered,
                status=status,
                error=error,
                retry_at=retry_at,
            )
        except Exception as exc:
            # the claim runs out and the delivery is tried again: at least once, same id
            if not self._outages.failed(exc):
                log.exception("recording webhook delivery %s failed", d.event_id)
            return
        if delivered:
            log.info("webhook %s %s delivered to %s", d.event_type, d.event_id, d.url)
        elif retry_at is None:
            log.warning(
                "webhook %s %s to %s given up after %d attempts: %s",
                d.event_type, d.event_id, d.url, d.attempts, error,
            )  # fmt: skip
        else:
            log.info(
                "webhook %s %s to %s failed (attempt %d: %s); again in %.0f s",
                d.event_type, d.event_id, d.url, d.attempts, error, retry_at - now,
            )  # fmt: skip


async def send(
    session: aiohttp.ClientSession,
    url: str,
    secrets: tuple[str, ...],
    message_id: str,
    event: dict[str, Any],
    clock: Callable[[], float] = time.time,
) -> tuple[int | None, str | None]:
    """One signed POST of `event`: the receiver's status (None: no answer) and what went wrong
    (None: a 2xx, delivered)."""
    body = orjson.dumps(event)
    status: int | None = None
    try:
        headers = signed_headers(secrets, message_id, body, clock())
        async with session.post(url, data=body, headers=headers, allow_redirects=False) as r:
            status = r.status
            if 200 <= r.status < 300:
                return status, None
            text = (await r.content.read(ERROR_BODY_BYTES)).decode("utf-8", "replace")
            return status, f"HTTP {r.status}: {text.strip()}"[:1000]
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
        return status, (f"{type(exc).__name__}: {exc}"[:1000] or type(exc).__name__)


def client_session(timeout: float) -> aiohttp.ClientSession:
    """The session deliveries go through: one attempt at most `timeout` seconds."""
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout),
        headers={"user-agent": f"backfill/{__version__} (webhooks)"},
    )
