"""The real-time gateway: `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`,
`/v1/responses` (relayed as sent to an upstream; an in-process chat engine answers it through
chat, `engines/responses.py`).

The same models and engines as batches (routing by `body.model`, renamed on the way upstream
exactly as for batches), answered at once instead of through a batch file:

- Streaming (`"stream": true`) is a relay: the upstream's SSE bytes go to the client as they
  arrive, never re-framed or buffered (`RelayResponse`, a raw ASGI response). When the client
  goes away (disconnect, or a failed write) the upstream connection is closed, which makes
  vLLM abort the request. Engines without streaming (in-process ones) answer 400 to
  `stream: true` and serve non-streamed requests through `send`.
- Priority: for models whose upstream accepts vLLM's `priority` field (`priority = true` in
  the model's config), a request without one gets `realtime_priority` (default 0; batch
  requests get `batch_priority`, default 10: lower runs first). Other upstreams get the body
  unchanged: a plain OpenAI server rejects unknown fields.
- Rate limits per project, separate from batch quotas: a token bucket of `realtime_rpm`
  requests per minute (bursts up to a minute's worth) and, when `realtime_tpm` is set, one of
  tokens per minute charged with an estimate at admission (about 4 bytes of prompt per token
  plus `max_tokens`). Over the limit: 429 `rate_limit_exceeded` with `retry-after` (seconds
  until the bucket holds enough again). A project's own limits (`backfill projects set
  --realtime-rpm/--realtime-tpm`) win over the settings; they are read from the store at most
  every `project_settings_ttl` seconds (`ProjectLimits`), so a change needs no restart, and a
  bucket whose limit changed is resized in place (keeping what it holds, up to the new size).
- Signals for the governor: every request moves the model's `RealtimeStats` (in flight,
  arrivals) and streamed ones add their TPOT as the gateway sees them.
- Usage: every request the engine answered gets one entry in the usage ledger at full price,
  written after its answer ends (`api/ledger.py`).

Upstream answers are passed through with their status (an upstream 400 stays a 400 with the
upstream's error body); transport failures become 503 `upstream_unavailable` / 504-like
`request_timeout` in the error envelope via `EngineUnavailable`.

`serve_request` is the use case (an `Answer`, or a `Relay` whose chunks are still to come);
the handler in `router()` only reads the body, calls it and turns the result into a response.
"""

# No `from __future__ import annotations`: FastAPI evaluates the handler annotations.
import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request
from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from backfill.api import openapi
from backfill.api.auth import Authenticator
from backfill.api.context import ApiContext, RealtimeModel
from backfill.api.ledger import RealtimeLedger, StreamUsage, answer_usage
from backfill.api.responses import call
from backfill.dispatch.signals import RealtimeStats
from backfill.domain import exact_json
from backfill.domain.records import Project, Usage
from backfill.engines.base import StreamingEngine
from backfill.errors import EngineUnavailable, InvalidRequest, NotFound, RateLimited
from backfill.store.base import Store

log = logging.getLogger("backfill.api")

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_TAIL = 1024  # bytes of a stream kept to find its usage


# -- rate limits ----------------------------------------------------------------------------


@dataclass(slots=True)
class TokenBucket:
    """`capacity` units, refilled at `rate` per second; starts full."""

    capacity: float
    rate: float
    level: float = math.nan
    updated: float = 0.0

    def take(self, amount: float, now: float) -> float:
        """Take `amount` if it is there (returns 0.0), else take nothing and return the
        seconds until it will be."""
        if math.isnan(self.level):
            self.level, self.updated = self.capacity, now
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now
        amount = min(amount, self.capacity)  # one huge request still passes a full bucket
        if self.level >= amount:
            self.level -= amount
            return 0.0
        return (amount - self.level) / self.rate


@dataclass
class RateLimiter:
    """Per-project real-time limits: requests per minute and (optionally) tokens per minute.
    `rpm` / `tpm` are the defaults; `check` takes a project's own where it has them."""

    rpm: float
    tpm: float | None = None
    clock: Callable[[], float] = time.monotonic
    _requests: dict[str, TokenBucket] = field(default_factory=dict)
    _tokens: dict[str, TokenBucket] = field(default_factory=dict)

    def check(
        self,
        project: str,
        tokens: float,
        *,
        rpm: float | None = None,
        tpm: float | None = None,
    ) -> None:
        """Admit one request of about `tokens` tokens for `project`, or raise `RateLimited`.
        `rpm` / `tpm`: the project's own limits (None: the defaults; 0: unlimited)."""
        now = self.clock()
        rpm = self.rpm if rpm is None else rpm
        tpm = self.tpm if tpm is None else tpm
        if rpm > 0:
            bucket = _bucket(self._requests, project, rpm)
            wait = bucket.take(1.0, now)
            if wait > 0:
                raise RateLimited(
                    f"Rate limit reached for real-time requests: {rpm:g} requests per "
                    f"minute. Please try again in {wait:.1f}s.",
                    retry_after=wait,
                )
        if tpm:
            tbucket = _bucket(self._tokens, project, tpm)
            wait = tbucket.take(tokens, now)
            if wait > 0:
                if rpm > 0:  # give the request slot back: nothing was sent
                    self._requests[project].level += 1.0
                raise RateLimited(
                    f"Rate limit reached for real-time requests: {tpm:g} tokens per "
                    f"minute. Please try again in {wait:.1f}s.",
                    retry_after=wait,
                )


def _bucket(buckets: dict[str, TokenBucket], project: str, per_minute: float) -> TokenBucket:
    """The project's bucket, sized for `per_minute` (resized in place if its limit changed)."""
    bucket = buckets.get(project)
    if bucket is None:
        bucket = buckets[project] = TokenBucket(per_minute, per_minute / 60.0)
    elif bucket.capacity != per_minute:
        bucket.capacity, bucket.rate = per_minute, per_minute / 60.0
        if not math.isnan(bucket.level):
            bucket.level = min(bucket.level, per_minute)
    return bucket


@dataclass
class ProjectLimits:
    """Each project's own real-time limits (rpm, tpm; None: the defaults), read from the store
    at most every `ttl` seconds per project."""

    store: Store
    ttl: float = 2.0
    clock: Callable[[], float] = time.monotonic
    _cached: dict[str, tuple[float, float | None, float | None]] = field(default_factory=dict)

    async def of(self, project_id: str) -> tuple[float | None, float | None]:
        now = self.clock()
        hit = self._cached.get(project_id)
        if hit is None or now >= hit[0]:
            own = await call(self.store.project_settings, project_id)
            rpm = own.realtime_rpm if own is not None else None
            tpm = own.realtime_tpm if own is not None else None
            hit = self._cached[project_id] = (now + self.ttl, rpm, tpm)
        return hit[1], hit[2]


def estimate_tokens(raw: bytes, body: dict[str, Any]) -> float:
    """A cheap upper-ish estimate: ~4 bytes of request per prompt token, plus `max_tokens`."""
    out = body.get("max_completion_tokens") or body.get("max_tokens") or 0
    if not isinstance(out, int) or isinstance(out, bool):
        out = 0
    return len(raw) / 4.0 + out


# -- the relay ------------------------------------------------------------------------------


class RelayResponse(Response):
    """Send `chunks` as they come; close them (and so the upstream request) when the client
    disconnects or a write fails."""

    def __init__(self, status_code: int, media_type: str, chunks: AsyncIterator[bytes]) -> None:
        self.status_code = status_code
        self.media_type = media_type
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})
        self.body = b""
        self._chunks = chunks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        relay = asyncio.ensure_future(self._relay(send))

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    relay.cancel()
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            await relay
        except asyncio.CancelledError:
            if not relay.cancelled():
                raise  # we are being cancelled, not the relay by a disconnect
        finally:
            watcher.cancel()
            relay.cancel()
            with contextlib.suppress(BaseException):
                await watcher
            aclose = getattr(self._chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _relay(self, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        try:
            async for chunk in self._chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except EngineUnavailable as exc:
            log.warning("real-time stream cut by the upstream: %s", exc.message)
        except OSError:
            return  # the client went away
        await send({"type": "http.response.body", "body": b"", "more_body": False})


# -- use case -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """A whole answer: the upstream's status and body, passed on as they are."""

    status: int
    body: bytes
    media_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    #: run once the answer is sent (its usage into the ledger)
    after: Callable[[], Awaitable[None]] | None = None


@dataclass(frozen=True)
class Relay:
    """A streamed answer: `chunks` yields the upstream's bytes as they arrive; closing it
    closes the upstream request."""

    status: int
    media_type: str
    chunks: AsyncIterator[bytes]


def resolve_model(ctx: ApiContext, endpoint: str, body: dict[str, Any]) -> RealtimeModel:
    """The served model `body.model` names, if it serves `endpoint`."""
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise InvalidRequest(
            "Missing required parameter: 'model'.",
            param="model",
            code="missing_required_parameter",
        )
    target = ctx.realtime.get(name)
    if target is None:
        raise NotFound(
            f"The model '{name}' does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )
    if endpoint not in target.engine.endpoints:
        raise InvalidRequest(
            f"The model '{name}' does not serve {endpoint}.",
            param="model",
            code="unsupported_endpoint",
        )
    return target


async def serve_request(
    ctx: ApiContext,
    project: Project,
    endpoint: str,
    raw: bytes,
    body: dict[str, Any],
    *,
    limiter: RateLimiter,
    limits: ProjectLimits | None = None,
    ledger: RealtimeLedger | None = None,
) -> Answer | Relay:
    """Run one real-time request (`raw` is the body as sent, `body` its parsed JSON)."""
    target = resolve_model(ctx, endpoint, body)
    rpm, tpm = (None, None) if limits is None else await limits.of(project.id)
    limiter.check(project.id, estimate_tokens(raw, body), rpm=rpm, tpm=tpm)
    if target.priority and "priority" not in body:
        body["priority"] = ctx.settings.realtime_priority
    used = _usage_recorder(ctx, ledger, project, target.name, endpoint)
    if body.get("stream") is True:
        return await _open_stream(target, endpoint, body, used)
    stats = target.stats
    stats.started()
    sent_at = time.monotonic()
    try:
        reply = await target.engine.send(endpoint, body)
    finally:
        stats.ended()
    headers = {}
    if reply.retry_after is not None:
        headers["retry-after"] = str(max(1, math.ceil(reply.retry_after)))
    return Answer(reply.status, reply.body, headers=headers, after=used.later(reply.body, sent_at))


@dataclass(frozen=True)
class _UsageRecorder:
    """Where one request's usage goes once it has ended (nowhere without a ledger)."""

    ledger: RealtimeLedger | None
    project: Project
    model: str
    endpoint: str
    at: int

    def later(self, body: bytes, sent_at: float) -> Callable[[], Awaitable[None]] | None:
        """A whole answer's entry, to write after it is sent."""
        ledger = self.ledger
        if ledger is None:
            return None
        seconds = time.monotonic() - sent_at

        async def record() -> None:
            await ledger.record(
                self.project, self.model, self.endpoint, answer_usage(body), seconds, self.at
            )

        return record

    def soon(self, usage: Usage, sent_at: float) -> None:
        """A stream's entry, written from a task of its own: the stream's end waits for none."""
        if self.ledger is not None:
            seconds = time.monotonic() - sent_at
            self.ledger.record_soon(
                self.project, self.model, self.endpoint, usage, seconds, self.at
            )


def _usage_recorder(
    ctx: ApiContext,
    ledger: RealtimeLedger | None,
    project: Project,
    model: str,
    endpoint: str,
) -> _UsageRecorder:
    return _UsageRecorder(ledger, project, model, endpoint, ctx.now())


async def _open_stream(
    target: RealtimeModel, endpoint: str, body: dict[str, Any], used: _UsageRecorder
) -> Answer | Relay:
    engine = target.engine
    if not isinstance(engine, StreamingEngine):
        raise InvalidRequest(
            f"The model '{target.name}' cannot stream; send the request without 'stream': true.",
            param="stream",
            code="unsupported_parameter",
        )
    stats = target.stats
    stats.started()
    key = stats.stream_opened()  # TTFT runs from here to the first body bytes
    stack = contextlib.AsyncExitStack()
    stack.callback(stats.closed, key)
    sent_at = time.monotonic()
    try:
        reply = await stack.enter_async_context(engine.stream(endpoint, body))
    except BaseException:
        stats.ended()
        await stack.aclose()
        raise
    media_type = reply.headers.get("content-type", "text/event-stream")
    if reply.status != 200:  # an error answer: pass it on whole
        try:
            data = b"".join([chunk async for chunk in reply.chunks])
        finally:
            stats.ended()
            await stack.aclose()
        return Answer(reply.status, data, media_type, after=used.later(data, sent_at))
    watch = StreamUsage()
    stack.callback(lambda: used.soon(watch.usage, sent_at))  # at the end, however it ends
    return Relay(reply.status, media_type, _timed(reply.chunks, stack, stats, key, watch.feed))


async def _timed(
    chunks: AsyncIterator[bytes],
    upstream: contextlib.AsyncExitStack,
    stats: RealtimeStats,
    key: int,
    seen: Callable[[bytes], None] = lambda chunk: None,
) -> AsyncIterator[bytes]:
    """Yield `chunks`; report the stream's TTFT at its first bytes (`key`: from
    `stats.stream_opened()`); at the end (or when closed) close `upstream` and report its TPOT
    (from the usage in its last bytes, else its count of events)."""
    first = last = 0.0
    events = 0
    tail = b""
    clock = stats.now
    try:
        async for chunk in chunks:
            now = clock()
            if not first and chunk:
                first = now
                stats.first_bytes(key)
            last = now
            events += chunk.count(b"data:")
            tail = (tail + chunk)[-_TAIL:]
            seen(chunk)  # the usage ledger's look at the stream
            yield chunk
    finally:
        await upstream.aclose()
        if first:
            found = _COMPLETION_TOKENS.findall(tail)
            tokens = int(found[-1]) if found else max(1, events - 2)
            tpot = (last - first) / (tokens - 1) if tokens > 1 else None
            stats.ended(tpot)
        else:
            stats.ended()


# -- HTTP -----------------------------------------------------------------------------------


def _json_body(raw: bytes) -> dict[str, Any]:
    try:
        body = exact_json.loads(raw)  # numbers go upstream as written
    except orjson.JSONDecodeError:
        raise InvalidRequest(
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, "
            "but what was sent was not valid JSON.)",
            code="invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_request_body")
    return body


def _response(reply: Answer | Relay) -> Response:
    if isinstance(reply, Relay):
        return RelayResponse(reply.status, reply.media_type, reply.chunks)
    background = None if reply.after is None else BackgroundTask(reply.after)
    return Response(
        reply.body, reply.status, reply.headers, media_type=reply.media_type, background=background
    )


def router(ctx: ApiContext, auth: Authenticator) -> APIRouter:
    r = APIRouter()
    CurrentProject = Annotated[Project, Depends(auth.require)]
    limiter = RateLimiter(ctx.settings.realtime_rpm, ctx.settings.realtime_tpm)
    limits = ProjectLimits(ctx.store, ctx.settings.project_settings_ttl)
    ledger = ctx.realtime_ledger  # made by create_app, which shows its counts on /metrics
    if ledger is None:
        raise RuntimeError("the real-time gateway needs ctx.realtime_ledger (create_app makes it)")

    def make(endpoint: str) -> Callable[[Request, Project], Any]:
        async def endpoint_handler(request: Request, project: CurrentProject) -> Response:
            raw = await request.body()
            body = _json_body(raw)
            return _response(
                await serve_request(
                    ctx, project, endpoint, raw, body, limiter=limiter, limits=limits, ledger=ledger
                )
            )

        return endpoint_handler

    for path in ENDPOINTS:
        r.add_api_route(path.removeprefix("/v1"), make(path), methods=["POST"], **openapi.REALTIME)
    return r
