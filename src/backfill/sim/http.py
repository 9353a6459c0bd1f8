"""The simulator server's HTTP/1.1 plumbing: an `asyncio.Protocol` fed by `httptools`.

`Connection` parses requests, answers them one after the other (a request that has to wait for
the engine is a `Pending` answer the connection holds until it is done), and keeps the
connection alive. `response` frames a whole answer; `STREAM_HEAD`, `frame` and `event` write a
chunked Server-Sent Events stream. `RequestError` is an OpenAI-shaped error answer. What to
answer is the `Handler`'s business (`backfill.sim.server.SimServer`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol, cast

import httptools
import orjson

__all__ = [
    "CLOSE",
    "DONE",
    "STREAM_HEAD",
    "Connection",
    "Handler",
    "Pending",
    "RequestError",
    "event",
    "frame",
    "response",
]

_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    413: b"Payload Too Large",
}
_HEAD = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n"
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n%s\r\n"
)
CLOSE = b"Connection: close\r\n"
_JSON = b"application/json"
DONE = b"data: [DONE]\n\n"
_MAX_BODY = 64 * 1024 * 1024


def frame(events: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(events), events)


def event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


def response(status: int, body: bytes, keep_alive: bool, content_type: bytes = _JSON) -> bytes:
    return (
        _HEAD
        % (
            status,
            _REASONS.get(status, b"Unknown"),
            content_type,
            len(body),
            b"" if keep_alive else CLOSE,
        )
        + body
    )


class RequestError(Exception):
    """An OpenAI-shaped error answer."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.payload = {"error": {"message": message, "type": type_, "param": param, "code": code}}


class Pending(Protocol):
    """An answer still being written; it calls `Connection.exchange_done` when it is."""

    done: bool
    keep_alive: bool

    def abort(self) -> None:
        """The connection is lost before the answer is done."""


class Handler(Protocol):
    def handle(
        self, connection: Connection, method: bytes, url: bytes, body: bytes, keep_alive: bool
    ) -> bytes | Pending:
        """The whole answer, or a `Pending` one that the connection waits for."""
        ...


class Connection(asyncio.Protocol):
    """One client connection: parse with httptools, answer requests one after the other."""

    def __init__(self, server: Handler) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.queue: deque[tuple[bytes, bytes, bytes, bool]] = deque()
        self.current: Pending | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.body_size = 0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.queue.clear()
        current = self.current
        if current is not None and not current.done:
            current.abort()
        self.current = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._close(abort=True)
        except httptools.HttpParserError:
            if not self.closed:
                error = RequestError(400, "Invalid HTTP request")
                self.write(response(400, orjson.dumps(error.payload), False))
                self._close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []
        self.body_size = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if self.body_size <= _MAX_BODY:
            self.body.append(body)

    def on_message_complete(self) -> None:
        body = b"".join(self.body) if self.body_size <= _MAX_BODY else b""
        if self.body_size > _MAX_BODY:
            self.url = b"/__too_large__"
        self.queue.append(
            (self.parser.get_method(), self.url, body, self.parser.should_keep_alive())
        )
        if self.current is None:
            self._next()

    # answering
    def _next(self) -> None:
        server = self.server
        while self.queue and self.current is None and not self.closed:
            method, url, body, keep_alive = self.queue.popleft()
            answer = server.handle(self, method, url, body, keep_alive)
            if isinstance(answer, bytes):
                self.write(answer)
                if not keep_alive:
                    self._close()
            else:
                self.current = answer

    def exchange_done(self, exchange: Pending) -> None:
        if self.current is exchange:
            self.current = None
        if not exchange.keep_alive:
            self._close()
        elif self.queue:
            self._next()

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def _close(self, abort: bool = False) -> None:
        self.closed = True
        self.queue.clear()
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()
