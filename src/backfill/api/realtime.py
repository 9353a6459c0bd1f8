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
  until the bucket holds enough again).
- Signals for the governor: every request moves the model's `RealtimeStats` (in flight,
  arrivals) and streamed ones add their TPOT as the gateway sees them.

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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from backfill.api import openapi
from backfill.api.auth import Authenticator
from backfill.api.context import ApiContext, RealtimeModel
from backfill.dispatch.signals import RealtimeStats
from backfill.domain import exact_json
from backfill.domain.records import Project
from backfill.engines.base import StreamingEngine
from backfill.errors import EngineUnavailable, InvalidRequest, NotFound, RateLimited

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
    """Per-project real-time limits: requests per minute and (optionally) tokens per minute."""

    rpm: float
    tpm: float | None = None
    clock: Callable[[], float] = time.monotonic
    _requests: dict[str, TokenBucket] = field(default_factory=dict)
    _tokens: dict[str, TokenBucket] = field(default_factory=dict)

    def check(self, project: str, tokens: float) -> None:
        """Admit one request of about `tokens` tokens for `project`, or raise `RateLimited`."""
        now = self.clock()
        if self.rpm > 0:
            bucket = self._requests.get(project)
            if bucket is None:
                bucket = self._requests[project] = TokenBucket(self.rpm, self.rpm / 60.0)
            wait = bucket.take(1.0, now)
            if wait > 0:
                raise RateLimited(
                    f"Rate limit reached for real-time requests: {self.rpm:g} requests per "
                    f"minute. Please try again in {wait:.1f}s.",
                    retry_after=wait,
                )
        if self.tpm:
            tbucket = self._tokens.get(project)
            if tbucket is None:
                tbucket = self._tokens[project] = TokenBucket(self.tpm, self.tpm / 60.0)
            wait = tbucket.take(tokens, now)
            if wait > 0:
                if self.rpm > 0:  # give the request slot back: nothing was sent
                    self._requests[project].level += 1.0
                raise RateLimited(
                    f"Rate limit reached for real-time requests: {self.tpm:g} tokens per "
                    f"minute. Please try again in {wait:.1f}s.",
                    retry_after=wait,
                )


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
) -> Answer | Relay:
    """Run one real-time request (`raw` is the body as sent, `body` its parsed JSON)."""
    target = resolve_model(ctx, endpoint, body)
    limiter.check(project.id, estimate_tokens(raw, body))
    if target.priority and "priority" not in body:
        body["priority"] = ctx.settings.realtime_priority
    if body.get("stream") is True:
        return await _open_stream(target, endpoint, body)
    stats = target.stats
    stats.started()
    try:
        reply = await target.engine.send(endpoint, body)
    finally:
        stats.ended()
    headers = {}
    if reply.retry_after is not None:
        headers["retry-after"] = str(max(1, math.ceil(reply.retry_after)))
    return Answer(reply.status, reply.body, headers=headers)


async def _open_stream(
    target: RealtimeModel, endpoint: str, body: dict[str, Any]
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
        return Answer(reply.status, data, media_type)
    return Relay(reply.status, media_type, _timed(reply.chunks, stack, stats, key))


async def _timed(
    chunks: AsyncIterator[bytes],
    upstream: contextlib.AsyncExitStack,
    stats: RealtimeStats,
    key: int,
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
    return Response(reply.body, reply.status, reply.headers, media_type=reply.media_type)


def router(ctx: ApiContext, auth: Authenticator) -> APIRouter:
    r = APIRouter()
    CurrentProject = Annotated[Project, Depends(auth.require)]
    limiter = RateLimiter(ctx.settings.realtime_rpm, ctx.settings.realtime_tpm)

    def make(endpoint: str) -> Callable[[Request, Project], Any]:
        async def endpoint_handler(request: Request, project: CurrentProject) -> Response:
            raw = await request.body()
            body = _json_body(raw)
            return _response(
                await serve_request(ctx, project, endpoint, raw, body, limiter=limiter)
            )

        return endpoint_handler

    for path in ENDPOINTS:
        r.add_api_route(path.removeprefix("/v1"), make(path), methods=["POST"], **openapi.REALTIME)
    return r
