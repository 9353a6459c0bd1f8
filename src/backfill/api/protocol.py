"""HTTP limits at the connection: uvicorn's httptools protocol with header limits, header and
body deadlines and a cap on open connections.

uvicorn's own settings are used where it has them: `timeout_keep_alive` closes idle keep-alive
connections, `backlog` (its default 2048, capped by the kernel's `somaxconn`) bounds the accept
queue, and `ws="none"` because no route speaks WebSocket. What it lacks, this subclass adds
around the parser callbacks, in a few lines each:

- Header size and count (`http_max_header_bytes`, `http_max_headers`): httptools has no header
  limit, and it joins a header arriving over many reads by concatenating bytes, so a 100 MB
  header costs quadratic CPU on the event loop (26 MB in 64 KiB reads: 3.4 s). We count bytes
  as they arrive while a request's headers are incomplete and answer 431 as soon as they pass
  the limit, so the parser never holds more than the limit plus one read. uvicorn's
  `h11_max_incomplete_event_size` would do this for the h11 parser only, which costs more CPU
  per request (see README, "HTTP limits") and still answers in plain text.
- A header deadline (`http_header_timeout_seconds`), from a new connection or from a request's
  first byte to the end of its headers. uvicorn arms no timer on a new connection and none while
  headers trickle in, so a client sending one byte every half second held its connection
  forever. Past the deadline: 408 if a request had begun, else the connection is closed.
- A body idle timeout (`http_body_idle_seconds`): a request body that stops arriving for that
  long mid-way gets 408, and the app sees `http.disconnect`, so it cleans up as for a client
  that went away (an upload deletes its partial blob). uvicorn has none: an upload idle for
  90 s still succeeded. Time is not counted while we are not reading (the app is slow to
  consume and flow control paused the socket, or the client waits for `100 Continue`). The
  timer is armed only for a body that did not arrive with its headers, so the small JSON
  bodies of real-time requests cost nothing; an ASGI middleware timing `receive()` instead
  cost ~10 us per request.
- A cap on open connections (`http_max_connections`). At the cap a new connection closes the
  one idle longest (no request running: between keep-alive requests, or still sending its
  headers), as nginx reuses keep-alive connections; only when every connection runs a request
  is the new one refused, with a 503 and `retry-after` once its headers are in. uvicorn's
  `limit_concurrency` is not used: it counts idle connections too, so a flood of idle sockets
  made it refuse real clients, and it answers in plain text.

Each answer written here (400 unparseable request, 408, 431, 503) is the OpenAI error envelope
with an `x-request-id` and `connection: close`, followed by a *lingering close*: we half-close,
drop whatever the client still sends for a moment, then close. Closing a socket that has unread
input makes the kernel send a reset, which can destroy the answer before the client reads it.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from backfill.api.middleware import new_request_id
from backfill.errors import error_body, status_type

log = logging.getLogger("backfill.api")

#: how long a refused or cut-off connection is drained before it is closed
LINGER_SECONDS = 2.0
#: a connection over the cap gets this long (at most) to send the headers its 503 answers
OVER_CAP_HEADER_SECONDS = 5.0
#: file descriptors kept for everything but client connections (database, blobs, upstreams)
FD_RESERVE = 1024


@dataclass(frozen=True, slots=True)
class HttpLimits:
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    header_timeout: float = 20.0
    body_idle_timeout: float = 30.0  # 0: none
    max_connections: int = 2048
    retry_after: int = 1  # seconds, on a 503 at the cap


class _Refused(Exception):
    """Raised in a parser callback to stop parsing; `data_received` sends the answer."""


class LimitedHttpProtocol(HttpToolsProtocol):
    """One client connection; `protocol_class(limits)` makes the class uvicorn instantiates."""

    limits: ClassVar[HttpLimits] = HttpLimits()
    #: connections with no request running, longest idle first (one registry per server)
    idle: ClassVar[OrderedDict[LimitedHttpProtocol, None]] = OrderedDict()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._awaiting_headers = True
        self._header_bytes = 0  # bytes received while this request's headers are incomplete
        self._exact_bytes = 0  # the url and header fields, as parsed
        self._header_count = 0
        self._message_started = False
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_at = 0.0  # loop time the body last moved
        self._linger_timer: asyncio.TimerHandle | None = None
        self._over_cap = False
        self._refusal: tuple[int, str, str] | None = None
        self._lingering = False

    # -- connection --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections and not self._close_idlest():
            self._over_cap = True
        super().connection_made(transport)
        if self._over_cap:
            self._arm_header_timer(min(OVER_CAP_HEADER_SECONDS, self.limits.header_timeout))
        else:
            self.idle[self] = None
            self._arm_header_timer(self.limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.idle.pop(self, None)
        for timer in (self._header_timer, self._body_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    @classmethod
    def _close_idlest(cls) -> bool:
        while cls.idle:
            conn, _ = cls.idle.popitem(last=False)
            if not conn.transport.is_closing():
                conn.transport.close()
                return True
        return False

    def data_received(self, data: bytes) -> None:
        # uvicorn's own, plus the byte count, and no warning for a refusal of ours
        if self._lingering:
            return
        if self._awaiting_headers:
            self._header_bytes += len(data)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError:
            if self._refusal is None:
                self.send_400_response("Invalid HTTP request received.")
            else:
                self._reply(*self._refusal)
            return
        if self._awaiting_headers:
            if self._header_bytes > self.limits.max_header_bytes:
                self._reply(*_too_large(self.limits))
        elif self._body_timer is None and self.limits.body_idle_timeout > 0:
            # a body still to come (the common small one arrived whole, with its headers)
            self._body_at = self.loop.time()
            self._body_timer = self.loop.call_later(
                self.limits.body_idle_timeout, self._on_body_idle
            )

    def send_400_response(self, msg: str) -> None:
        self._reply(400, "We could not parse your HTTP request.", "invalid_http_request")

    # -- parser callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._message_started = True
        if self._header_timer is None:
            self._arm_header_timer(self.limits.header_timeout)

    def on_url(self, url: bytes) -> None:
        self._exact_bytes += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._exact_bytes += len(name) + len(value) + 4
        if self._header_count > self.limits.max_headers:
            self._refuse(
                431,
                f"Too many request header fields (at most {self.limits.max_headers}).",
                "request_header_fields_too_large",
            )
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._awaiting_headers = False
        self._message_started = False
        if self._exact_bytes > self.limits.max_header_bytes:
            self._refuse(*_too_large(self.limits))
        if self._over_cap:
            self._refuse(
                503,
                "The server is at its connection limit. Please retry shortly.",
                "server_busy",
            )
        self.idle.pop(self, None)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._body_at = self.loop.time()
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        self._awaiting_headers = True
        self._header_bytes = self._exact_bytes = self._header_count = 0

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:  # idle now (no pipelined request started)
            self.idle[self] = None
            self.idle.move_to_end(self)

    # -- answers -----------------------------------------------------------------------------

    def _arm_header_timer(self, seconds: float) -> None:
        self._header_timer = self.loop.call_later(seconds, self._on_header_timeout)

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self._message_started:
            self._reply(408, "The request headers took too long to arrive.", "request_timeout")
        else:  # connected and never sent a byte
            self.transport.close()

    def _on_body_idle(self) -> None:
        self._body_timer = None
        if self._awaiting_headers or self.transport.is_closing():
            return  # the body is complete
        now = self.loop.time()
        cycle = self.cycle
        if self.flow.read_paused or cycle.waiting_for_100_continue:
            self._body_at = now  # we are not reading: the app is the slow one
        idle = now - self._body_at
        timeout = self.limits.body_idle_timeout
        if idle < timeout:
            self._body_timer = self.loop.call_later(timeout - idle, self._on_body_idle)
        elif cycle.response_complete:
            self.transport.close()  # answered already (e.g. 401 before reading the upload)
        else:
            self._reply(
                408,
                f"The request body stalled: nothing arrived for {timeout:g} seconds.",
                "request_timeout",
            )

    def _refuse(self, status: int, message: str, code: str) -> None:
        self._refusal = (status, message, code)
        raise _Refused(message)

    def _reply(self, status: int, message: str, code: str) -> None:
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # whatever the app still sends is dropped
            cycle.message_event.set()
            if cycle.response_started:
                self.transport.close()
                return
        body = orjson.dumps(error_body(message, status_type(status), None, code))
        head = [STATUS_LINE[status]]
        head += [
            name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers
        ]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n",
            b"x-request-id: " + new_request_id().encode("ascii") + b"\r\n",
        ]
        if status == 503:
            head.append(b"retry-after: %d\r\n" % self.limits.retry_after)
        elif status != 408:
            head.append(b"x-should-retry: false\r\n")
        self.transport.write(b"".join(head) + b"\r\n" + body)
        self._linger()

    def _linger(self) -> None:
        """Half-close, drop what the client still sends, close when it does or soon after."""
        self._lingering = True
        self.idle.pop(self, None)
        self.connections.discard(self)
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None
        self._unset_keepalive_if_required()
        self.flow.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._linger_timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)


def _too_large(limits: HttpLimits) -> tuple[int, str, str]:
    return (
        431,
        f"The request headers are too large (at most {limits.max_header_bytes} bytes).",
        "request_header_fields_too_large",
    )


def protocol_class(limits: HttpLimits) -> type[LimitedHttpProtocol]:
    """The protocol class for one server: its limits and its own registry of idle connections."""
    return type(
        "BackfillHttpProtocol", (LimitedHttpProtocol,), {"limits": limits, "idle": OrderedDict()}
    )


def fit_connections(max_connections: int) -> int:
    """Raise this process's open-file limit towards what `max_connections` needs, and return
    how many connections fit. A client connection can hold a second descriptor (its real-time
    request's upstream connection), and `FD_RESERVE` is kept for everything else: running out
    of descriptors makes `accept` fail, which clients see as connection resets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * max_connections + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as exc:
            log.debug("setrlimit(NOFILE, %d) refused: %s", target, exc)  # told below
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return max_connections
    fitted = max(16, (soft - FD_RESERVE) // 2, soft // 4)
    fitted = min(fitted, max_connections)
    log.warning(
        "open-file limit %d fits %d connections, not http_max_connections=%d; raise `ulimit -n`",
        soft,
        fitted,
        max_connections,
    )
    return fitted
