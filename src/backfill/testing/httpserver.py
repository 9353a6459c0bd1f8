"""HTTP/1.1 server plumbing for the helper servers: the echo upstream and the simulator.

Both are benchmark baselines, so neither runs on a web framework: a server here is an
`asyncio.Protocol` fed by the `httptools` parser (on uvloop when installed) and serves tens of
thousands of small requests per second on one core. This module is the one copy of that
plumbing; what to answer is the application's business (`backfill.testing.upstream` over
`backfill.testing.echo`, and `backfill.sim.server`).

One request, one `Reply`. The `Connection` parses a request and hands it at once, with its
`Reply`, to the `Handler`. The handler answers now or later (a timer, the simulator's engine),
in one piece (`Reply.end`) or as a stream (`Reply.write`, then `end`), or drops the connection
(`Reply.drop`). Answers on a keep-alive connection always go out in request order: the first
reply in line writes straight to the socket, later ones buffer until every reply before them
has ended. A reply without keep-alive closes the connection after its last byte. When the
client goes away, every reply not yet ended hears it through `on_abort`.

Requests whose body passes `max_body` and requests httptools cannot parse are answered here
(413, or 400 and close) in OpenAI's error shape. Framing helpers: `response` (a whole answer),
`stream_head` + `chunk` + `LAST_CHUNK` (chunked transfer), `event` + `DONE` (Server-Sent
Events). `listen`, `announce` and `run` are the command-line lifecycle both servers share:
bind, print `READY <port>`, serve until SIGTERM/SIGINT.

This lives in `testing/` (already the home of the helper-process plumbing the simulator uses,
`testing.child`) and imports no application code, so `sim/` depends on it and `testing/` never
imports `sim/`. Not named `http.py`: a file run as a script from this folder would shadow the
standard library's `http` package (which `urllib` imports).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, cast

import httptools
import orjson

__all__ = [
    "DONE",
    "JSON",
    "LAST_CHUNK",
    "Connection",
    "Handler",
    "Reply",
    "Request",
    "announce",
    "chunk",
    "error_body",
    "event",
    "listen",
    "port_of",
    "response",
    "run",
    "stream_head",
]

_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    404: b"Not Found",
    405: b"Method Not Allowed",
    413: b"Payload Too Large",
    429: b"Too Many Requests",
    500: b"Internal Server Error",
}
_HEAD = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s%s\r\n"
_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n%s\r\n"
)
_CLOSE = b"Connection: close\r\n"
JSON = b"application/json"
DONE = b"data: [DONE]\n\n"
LAST_CHUNK = b"0\r\n\r\n"


def response(
    status: int, body: bytes, keep_alive: bool, content_type: bytes = JSON, headers: bytes = b""
) -> bytes:
    """A whole answer. `headers`: extra header lines, each ending in CRLF."""
    reason = _REASONS.get(status, b"Unknown")
    close = b"" if keep_alive else _CLOSE
    return _HEAD % (status, reason, content_type, len(body), headers, close) + body


def error_body(
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> bytes:
    """OpenAI's error envelope."""
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


def stream_head(keep_alive: bool) -> bytes:
    """The head of a chunked `text/event-stream` answer."""
    return _STREAM_HEAD % (b"" if keep_alive else _CLOSE)


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def event(payload: bytes) -> bytes:
    """One Server-Sent Event."""
    return b"data: " + payload + b"\n\n"


class Request:
    """One parsed request: method, URL (path and query), Authorization header, body."""

    __slots__ = ("authorization", "body", "method", "url")

    def __init__(self, method: bytes, url: bytes, authorization: bytes | None, body: bytes) -> None:
        self.method = method
        self.url = url
        self.authorization = authorization
        self.body = body


class Reply:
    """One request's answer, sent in request order (see the module doc)."""

    __slots__ = ("_buffer", "_connection", "done", "dropped", "keep_alive", "on_abort")

    def __init__(self, connection: Connection, keep_alive: bool) -> None:
        self._connection = connection
        self._buffer: list[bytes] = []
        self.keep_alive = keep_alive
        self.done = False
        self.dropped = False
        #: called once if the connection goes away before `end` or `drop`
        self.on_abort: Callable[[], None] | None = None

    @property
    def closed(self) -> bool:
        """The connection is gone (or closing): nothing written any more goes out."""
        return self._connection.closed

    def write(self, data: bytes) -> None:
        """Part of the answer: out now if this reply is first in line, else buffered."""
        if not self.done:
            self._connection.send(self, data)

    def end(self, data: bytes = b"") -> None:
        """The rest of the answer; the next reply in line may go out."""
        if not self.done:
            self.done = True
            self._connection.finish(self, data)

    def drop(self) -> None:
        """Close the connection without (finishing) an answer when this reply's turn comes."""
        if not self.done:
            self.done = self.dropped = True
            self._connection.finish(self, b"")


class Handler(Protocol):
    def handle(self, request: Request, reply: Reply) -> None:
        """Answer `request` through `reply`, now or later."""


class Connection(asyncio.Protocol):
    """One client connection: parse with httptools, hand each request over, answer in order."""

    def __init__(self, handler: Handler, max_body: int | None = None) -> None:
        self.handler = handler
        self.max_body = max_body
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.replies: deque[Reply] = deque()  # not yet fully sent, in request order
        self.closed = False
        self._url = b""
        self._auth: bytes | None = None
        self._body: list[bytes] = []
        self._body_size = 0

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        replies = self.replies
        while replies:
            reply = replies.popleft()
            if not reply.done:
                reply.done = True
                if reply.on_abort is not None:
                    reply.on_abort()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._close(abort=True)
        except httptools.HttpParserError:
            if not self.closed and self.transport is not None:
                self.transport.pause_reading()  # the parser is spent: read nothing more
                reply = Reply(self, keep_alive=False)
                self.replies.append(reply)
                reply.end(response(400, error_body("Invalid HTTP request"), False))

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._auth = None
        self._body = []
        self._body_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) == 13 and name.lower() == b"authorization":
            self._auth = value

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self.max_body is None or self._body_size <= self.max_body:
            self._body.append(body)

    def on_message_complete(self) -> None:
        if self.closed:
            return  # pipelined behind a `Connection: close` answer or a dropped one
        parser = self.parser
        reply = Reply(self, parser.should_keep_alive())
        self.replies.append(reply)
        if self.max_body is not None and self._body_size > self.max_body:
            reply.end(response(413, error_body("Request body too large"), reply.keep_alive))
            return
        body = b"".join(self._body)
        self.handler.handle(Request(parser.get_method(), self._url, self._auth, body), reply)

    # answering, in order: the first reply in line writes to the socket, the others buffer
    def send(self, reply: Reply, data: bytes) -> None:
        if self.closed:
            return
        if self.replies[0] is reply:
            assert self.transport is not None
            self.transport.write(data)
        else:
            reply._buffer.append(data)

    def finish(self, reply: Reply, data: bytes) -> None:
        """`reply` has ended (or dropped) with `data` as its last bytes."""
        if self.closed:
            return
        replies = self.replies
        if replies[0] is not reply:
            if data:
                reply._buffer.append(data)
            return
        self._retire(data)

    def _retire(self, data: bytes) -> None:
        """The first reply in line has ended: send `data`, then every reply behind it that is
        ready, until one that is still being answered (it writes to the socket from now on)."""
        replies = self.replies
        transport = self.transport
        assert transport is not None
        while True:
            head = replies.popleft()
            if head.dropped:
                self._close(abort=True)
                return
            if data:
                transport.write(data)
            if not head.keep_alive:
                self._close()
                return
            if not replies:
                return
            head = replies[0]
            data = b"".join(head._buffer)
            head._buffer.clear()
            if not head.done:
                if data:
                    transport.write(data)
                return

    def _close(self, abort: bool = False) -> None:
        self.closed = True
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()


async def listen(
    handler: Handler,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    max_body: int | None = None,
    backlog: int = 4096,
) -> asyncio.Server:
    """Serve `handler` on the running loop (port 0 picks a free one)."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: Connection(handler, max_body), host, port, backlog=backlog, reuse_address=True
    )


def port_of(server: asyncio.Server) -> int:
    port: int = server.sockets[0].getsockname()[1]
    return port


async def announce(port: int) -> None:
    """Print `READY <port>` (what `testing.child.spawn_ready` waits for), then wait for
    SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sys.stdout.write(f"READY {port}\n")
    sys.stdout.flush()
    await stop.wait()


def run(main: Coroutine[Any, Any, None], *, uvloop: bool = True) -> None:
    """Run `main` on uvloop when wanted and installed, else on asyncio's own loop."""
    if uvloop:
        try:
            import uvloop as _uvloop
        except ImportError:
            pass
        else:
            _uvloop.run(main)
            return
    asyncio.run(main)
