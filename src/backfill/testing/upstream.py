"""A real, fast, scriptable OpenAI-compatible upstream for tests and benchmarks.

    python -m backfill.testing.upstream --host 127.0.0.1 --port 0 [--api-key K] [--latency-ms X]

prints `READY <port>` once it listens. It speaks HTTP/1.1 on raw asyncio (an `asyncio.Protocol`
fed by the `httptools` parser, on uvloop when installed) rather than on a web framework, because
benchmarks compare backfill's throughput against it: it must not be the bottleneck, and it
serves tens of thousands of small requests per second on one core. This module holds that
connection protocol and the command line; the answers come from `backfill.testing.echo`.

Endpoints: `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings` (echo answers with a
word-count `usage`), `GET /v1/models`, `GET /stats`, `POST /reset`, `GET /health`.
`"stream": true` answers the echo as SSE chunks (one word per chunk, then a usage chunk with
`stream_options.include_usage`, then `data: [DONE]`), sent in one write. `/stats` also shows the
`priority` field of the last completion request (`last_priority`, null when it had none).

Directives in the request's text (the last message's content, the prompt, or the input) script
failures per request, so a test can mix good and bad lines in one batch:

- `#fail400`        400 with an OpenAI error body (`context_length_exceeded`)
- `#fail500:N`      500 the first N times this exact text is seen, then success (no N: always)
- `#fail429:N[:S]`  429 with `Retry-After: S` (default 0) the first N times (no N: always)
- `#sleep:MS`       answer after MS milliseconds (a timer, so other requests are not delayed)
- `#close`          drop the connection without answering
- `#html:N`, `#empty:N`, `#truncated:N`, `#array:N`: 200 with an HTML, empty, truncated-JSON
                    or JSON-array body the first N times (no N: always)
- `#deep:N`         a chat answer carrying an object nested N levels deep (pretty-printed)

Keep-alive and pipelining: answers on one connection always go out in request order even when
a later request finishes first (each request takes a slot in a per-connection queue; the queue
is flushed from its head). Delays use `loop.call_later`, never a task per request.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections import deque
from typing import cast

import httptools

from backfill.testing.echo import Answer, UpstreamState, error, handle
from backfill.testing.process import UpstreamProcess, start_upstream

__all__ = ["UpstreamProcess", "UpstreamState", "main", "serve", "start_upstream"]

_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    404: b"Not Found",
    405: b"Method Not Allowed",
    429: b"Too Many Requests",
    500: b"Internal Server Error",
}
_HEAD = (
    b"HTTP/1.1 %d %s\r\n"
    b"Content-Type: %s\r\n"
    b"Content-Length: %d\r\n"
    b"x-request-id: req-%d\r\n"
    b"%s%s\r\n%s"
)


class _Slot:
    __slots__ = ("close", "data", "drop", "ready")

    def __init__(self) -> None:
        self.data = b""
        self.ready = False
        self.close = False
        self.drop = False


class HttpConnection(asyncio.Protocol):
    """One client connection: parse with httptools, answer in order, keep alive."""

    def __init__(self, state: UpstreamState) -> None:
        self.state = state
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.pending: deque[_Slot] = deque()
        self.url = b""
        self.auth: bytes | None = None
        self.body: list[bytes] = []
        self.closed = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but behave as one
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._abort()
        except httptools.HttpParserError:
            if self.transport is not None and not self.closed:
                answer = error(400, "Invalid HTTP request", "invalid_request_error", None, None)
                self._respond(answer, keep_alive=False)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.auth = None
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) == 13 and name.lower() == b"authorization":
            self.auth = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = b"".join(self.body)
        answer = handle(self.state, self.parser.get_method(), self.url, self.auth, body)
        self._respond(answer, keep_alive=self.parser.should_keep_alive())

    # answering, in order
    def _respond(self, answer: Answer, *, keep_alive: bool) -> None:
        if answer.drop:
            data = b""
        else:
            self.state.answered += 1
            data = _HEAD % (
                answer.status,
                _REASONS.get(answer.status, b"Unknown"),
                answer.content_type,
                len(answer.body),
                self.state.answered,
                answer.headers,
                b"" if keep_alive else b"Connection: close\r\n",
                answer.body,
            )
        if answer.delay <= 0 and not self.pending and not answer.drop:
            assert self.transport is not None
            self.transport.write(data)
            if not keep_alive:
                self._close()
            return
        slot = _Slot()
        slot.data = data
        slot.close = not keep_alive
        slot.drop = answer.drop
        self.pending.append(slot)
        if answer.delay > 0:
            asyncio.get_running_loop().call_later(answer.delay, self._ready, slot)
        else:
            self._ready(slot)

    def _ready(self, slot: _Slot) -> None:
        slot.ready = True
        pending = self.pending
        transport = self.transport
        while pending and pending[0].ready and not self.closed and transport is not None:
            head = pending.popleft()
            if head.drop:
                self._abort()
                return
            transport.write(head.data)
            if head.close:
                self._close()
                return

    def _close(self) -> None:
        self.closed = True
        self.pending.clear()
        if self.transport is not None:
            self.transport.close()

    def _abort(self) -> None:
        self.closed = True
        self.pending.clear()
        if self.transport is not None:
            self.transport.abort()


async def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    api_key: str | None = None,
    latency_ms: float = 0.0,
    backlog: int = 4096,
) -> tuple[asyncio.Server, UpstreamState]:
    """Start listening on the running loop; returns the server and its shared state."""
    state = UpstreamState(api_key=api_key, latency=latency_ms / 1000.0)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: HttpConnection(state), host, port, backlog=backlog, reuse_address=True
    )
    return server, state


async def _main(args: argparse.Namespace) -> None:
    server, _ = await serve(args.host, args.port, api_key=args.api_key, latency_ms=args.latency_ms)
    port = server.sockets[0].getsockname()[1]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sys.stdout.write(f"READY {port}\n")
    sys.stdout.flush()
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m backfill.testing.upstream",
        description="Fast, scriptable OpenAI-compatible upstream for tests and benchmarks.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay every answer")
    parser.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    args = parser.parse_args(argv)
    if not args.no_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(_main(args))
            return
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
