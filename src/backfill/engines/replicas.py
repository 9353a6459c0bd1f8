"""`ReplicaSet`: one model served by several OpenAI-compatible upstreams (replicas).

A model whose config names several `urls` gets a `ReplicaSet` instead of an `OpenAIEngine`
(`engines/registry.py`). It implements the same interface (`send`, `stream`, `load_metrics`,
`start`/`close`) over one `OpenAIEngine` per replica, so the dispatcher, the governor and the
real-time gateway need no change and know nothing of replicas. Design decisions:

- **One window per model, one set of signals per replica.** The dispatcher's window (moved by
  the governor) still bounds the model's batch requests at once, `max_concurrency` being the
  model's total across its replicas; each replica has its own in-flight count, its own metrics
  scrape and its own health, and the routing keeps the replicas' shares of the window even by
  load, not by a second fixed limit per replica (a replica that runs slower keeps more requests
  in flight and so gets fewer new ones). A per-replica window would need the governor to
  decide per replica; the summed view below keeps it one decision per model for now.
- **The governor sees the model, summed.** `load_metrics()` scrapes the healthy replicas at
  once and merges their load figures: running and waiting summed over the replicas that
  answered, KV-usage ratios averaged (as `backfill.metrics.parse` folds a server's engines),
  and the TPOT counters summed over every replica's *last known* values, so that a replica
  missing one scrape does not make the counters jump back and forth (a restarted one, whose
  counters restart at 0, makes one negative delta, which the governor skips). Each replica's
  running + waiting also feeds its routing load (`Router.observe`).
- **Routing is pure** (`engines/routing.py`): least-loaded, affinity (the replica holding the
  request's prefix group, `domain/prefixes.affinity_key` over the first 512 characters of the
  prompt, unless it is much busier) or round-robin, and drain/recover. This module only does
  the I/O around it.
- **Failover.** An attempt that gets no answer because the connection failed
  (`upstream_unavailable`: refused, reset, cut short) drains the replica and is re-sent at once
  to another healthy replica, inside the same `send` (and the same for a stream that failed
  before its first byte): a dead replica costs a request no attempt of the dispatcher's retry
  policy and no back-off. A timeout (`request_timeout`) also drains the replica, but is not
  re-sent here (it used the request's budget): it goes back to the dispatcher, whose retry is
  sent elsewhere, as is the retry of a 5xx answer. "Elsewhere" is remembered by the identity
  of the request's body (the dispatcher re-sends the same dict object), in a bounded map
  `id(body) -> replica that failed it`; a stale entry can only make one request pass over one
  replica once.
- **Recovery.** A background task probes each drained replica (`OpenAIEngine.probe`: `GET
  /v1/models`) when the router says it is due (1 s after the drain, doubling while it keeps
  failing, at most 30 s); an answer puts it back.

A replica's URL appears in the operator's log (drained, back), never in an answer or an error
file: the errors raised are the replica engine's, which name no host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from backfill.domain.prefixes import AFFINITY_BLOCKS, affinity_key, prefix_blocks, prompt_text
from backfill.engines.base import EngineReply, StreamReply
from backfill.engines.openai import OpenAIEngine
from backfill.engines.routing import Router
from backfill.errors import EngineUnavailable
from backfill.metrics import RATIOS, RUNNING, TPOT, WAITING, first_of
from backfill.settings import ModelConfig

log = logging.getLogger("backfill.replicas")

#: seconds between looks at which drained replicas are due for a probe
WATCH_INTERVAL = 0.25
#: requests whose failed replica is remembered (for their retry)
MAX_FAILED_BODIES = 65536
#: counter names whose last known value per replica is kept (TPOT histogram sums and counts)
COUNTERS = frozenset(name for pair in TPOT for name in pair)


def merge_loads(
    current: list[dict[str, float] | None], last_known: list[dict[str, float] | None]
) -> dict[str, float] | None:
    """The model's load figures from its replicas' (see the module doc): gauges from the
    replicas that answered now (`current`), summed, ratios averaged; counters summed over every
    replica's `last_known` figures. None when no replica answered."""
    answered = [m for m in current if m is not None]
    if not answered:
        return None
    out: dict[str, float] = {}
    ratios: dict[str, list[float]] = {}
    for figures in answered:
        for name, value in figures.items():
            if name in COUNTERS:
                continue
            if name in RATIOS:
                ratios.setdefault(name, []).append(value)
            else:
                out[name] = out.get(name, 0.0) + value
    for name, values in ratios.items():
        out[name] = sum(values) / len(values)
    for known in last_known:
        for name, value in (known or {}).items():
            if name in COUNTERS:
                out[name] = out.get(name, 0.0) + value
    return out


class ReplicaSet:
    """Several `OpenAIEngine`s serving one model, behind the one-engine interface."""

    def __init__(self, config: ModelConfig, *, router: Router | None = None) -> None:
        self.config = config
        self.model = config.name
        self.endpoints = frozenset(config.endpoints)
        self.urls = config.upstream_urls
        self.replicas = [
            OpenAIEngine(config.model_copy(update={"url": url, "urls": []})) for url in self.urls
        ]
        self.router = router or Router(len(self.replicas), config.routing)
        self._failed_on: OrderedDict[int, int] = OrderedDict()
        self._last: list[dict[str, float] | None] = [None] * len(self.replicas)
        self._watch: asyncio.Task[None] | None = None
        self._clock = time.monotonic

    # -- life ---------------------------------------------------------------------------------
    async def start(self) -> None:
        for replica in self.replicas:
            await replica.start()
        if self._watch is None:
            self._watch = asyncio.create_task(self._watch_drained(), name=f"replicas-{self.model}")

    async def close(self) -> None:
        if self._watch is not None:
            log.info("model %r replicas at close: %s", self.model, self.replica_stats())
        task, self._watch = self._watch, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for replica in self.replicas:
            await replica.close()

    # -- routing ------------------------------------------------------------------------------
    def _key(self, endpoint: str, body: dict[str, Any]) -> int | None:
        if self.router.routing != "affinity":
            return None
        text = prompt_text(endpoint, body)
        return affinity_key(prefix_blocks(text, max_blocks=AFFINITY_BLOCKS))

    def _failure(self, i: int, exc: EngineUnavailable | None, status: int | None = None) -> None:
        """Attempt at replica `i` failed: no answer (`exc`) or an answer >= 500 (`status`)."""
        if self.router.failed(i, answered=exc is None, now=self._clock()):
            why = exc.message if exc is not None else f"answers {status}"
            log.warning("model %r: replica %s drained (%s)", self.model, self.urls[i], why)

    def _remember(self, token: int, i: int) -> None:
        failed = self._failed_on
        failed[token] = i
        failed.move_to_end(token)
        if len(failed) > MAX_FAILED_BODIES:
            failed.popitem(last=False)

    # -- the Engine interface -----------------------------------------------------------------
    async def send(
        self,
        endpoint: str,
        body: dict[str, Any],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (the Engine protocol's per-request budget)
    ) -> EngineReply:
        router = self.router
        key = self._key(endpoint, body)
        token = id(body)
        avoid = self._failed_on.pop(token, None)
        tried: set[int] = set()
        while True:
            i = router.pick(key, avoid)
            router.started(i)
            try:
                reply = await self.replicas[i].send(endpoint, body, timeout=timeout)
            except EngineUnavailable as exc:
                self._failure(i, exc)
                tried.add(i)
                if exc.code == "upstream_unavailable" and self._others(tried):
                    avoid = i
                    continue  # the connection failed: at once to another replica
                self._remember(token, i)
                raise
            finally:
                router.finished(i)
            if reply.status >= 500:
                self._failure(i, None, reply.status)
                self._remember(token, i)
            else:
                router.succeeded(i)
            return reply

    def _others(self, tried: set[int]) -> bool:
        """Whether a healthy replica not yet tried for this request remains."""
        return any(
            i not in tried and not state.drained for i, state in enumerate(self.router.states)
        )

    @contextlib.asynccontextmanager
    async def stream(
        self,
        endpoint: str,
        body: dict[str, Any],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (the per-request budget)
    ) -> AsyncIterator[StreamReply]:
        """Stream from one replica; a connection that fails before the answer starts is tried
        on the next healthy replica."""
        key = self._key(endpoint, body)
        avoid: int | None = None
        tried: set[int] = set()
        async with contextlib.AsyncExitStack() as stack:
            while True:
                i = self.router.pick(key, avoid)
                try:
                    reply = await stack.enter_async_context(
                        self._replica_stream(i, endpoint, body, timeout)
                    )
                except EngineUnavailable as exc:
                    tried.add(i)
                    if exc.code == "upstream_unavailable" and self._others(tried):
                        avoid = i
                        continue
                    raise
                break
            yield reply

    @contextlib.asynccontextmanager
    async def _replica_stream(
        self,
        i: int,
        endpoint: str,
        body: dict[str, Any],
        timeout: float | None,  # noqa: ASYNC109 (the per-request budget)
    ) -> AsyncIterator[StreamReply]:
        router = self.router
        router.started(i)
        try:
            try:
                opened = self.replicas[i].stream(endpoint, body, timeout=timeout)
                reply = await opened.__aenter__()
            except EngineUnavailable as exc:
                self._failure(i, exc)
                raise
            try:
                if reply.status >= 500:
                    self._failure(i, None, reply.status)
                else:
                    router.succeeded(i)
                yield StreamReply(reply.status, reply.headers, self._chunks(i, reply.chunks))
            except BaseException as exc:
                if not await opened.__aexit__(type(exc), exc, exc.__traceback__):
                    raise
            else:
                await opened.__aexit__(None, None, None)
        finally:
            router.finished(i)

    async def _chunks(self, i: int, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        try:
            async for data in chunks:
                yield data
        except EngineUnavailable as exc:
            self._failure(i, exc)
            raise

    async def load_metrics(self) -> dict[str, float] | None:
        """The model's load, merged from the healthy replicas' scrapes (see `merge_loads`)."""
        router = self.router
        live = [i for i, state in enumerate(router.states) if not state.drained]
        results = await asyncio.gather(*(self.replicas[i].load_metrics() for i in live))
        current: list[dict[str, float] | None] = []
        for i, figures in zip(live, results, strict=True):
            if figures is None:
                router.observe(i, None)
                continue
            self._last[i] = figures
            current.append(figures)
            running = first_of(figures, RUNNING)
            waiting = first_of(figures, WAITING)
            router.observe(i, None if running is None else running + (waiting or 0.0))
        return merge_loads(current, self._last)

    # -- health -------------------------------------------------------------------------------
    async def _watch_drained(self) -> None:
        router = self.router
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            now = self._clock()
            due = [i for i in range(len(self.replicas)) if router.probe_due(i, now)]
            if not due:
                continue
            try:
                answers = await asyncio.gather(*(self.replicas[i].probe() for i in due))
            except Exception:  # a probe bug must not end the watch: drained replicas stay out
                log.exception("model %r: probing drained replicas failed", self.model)
                for i in due:
                    router.probe_failed(i, self._clock())
                continue
            for i, ok in zip(due, answers, strict=True):
                if ok:
                    router.recovered(i)
                    log.warning("model %r: replica %s answers again", self.model, self.urls[i])
                else:
                    router.probe_failed(i, self._clock())

    def replica_stats(self) -> list[dict[str, Any]]:
        """Each replica's figures, for logs, tests and benches."""
        return [
            {
                "url": url,
                "in_flight": state.in_flight,
                "external": state.external,
                "sent": state.sent,
                "errors": state.errors,
                "spilled": state.spilled,
                "drained": state.drained,
            }
            for url, state in zip(self.urls, self.router.states, strict=True)
        ]
