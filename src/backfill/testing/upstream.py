"""A real, fast, scriptable OpenAI-compatible upstream for tests and benchmarks.

    python -m backfill.testing.upstream --host 127.0.0.1 --port 0 [--api-key K] [--latency-ms X]

prints `READY <port>` once it listens. It speaks HTTP/1.1 on raw asyncio (an `asyncio.Protocol`
fed by the `httptools` parser, on uvloop when installed) rather than on a web framework, because
benchmarks compare backfill's throughput against it: it must not be the bottleneck, and it
serves tens of thousands of small requests per second on one core.

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

Keep-alive and pipelining: answers on one connection always go out in request order even when
a later request finishes first (each request takes a slot in a per-connection queue; the queue
is flushed from its head). Delays use `loop.call_later`, never a task per request.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import re
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, cast

import httptools
import orjson

from backfill.testing.process import UpstreamProcess, start_upstream

__all__ = ["UpstreamProcess", "UpstreamState", "main", "serve", "start_upstream"]

_DIRECTIVE = re.compile(r"#(fail400|fail500|fail429|sleep|close)(?::(\d+))?(?::(\d+(?:\.\d+)?))?")
_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    404: b"Not Found",
    405: b"Method Not Allowed",
    429: b"Too Many Requests",
    500: b"Internal Server Error",
}
_MODELS_PATH = b"/v1/models"
_HEAD = (
    b"HTTP/1.1 %d %s\r\n"
    b"Content-Type: %s\r\n"
    b"Content-Length: %d\r\n"
    b"x-request-id: req-%d\r\n"
    b"%s%s\r\n%s"
)


@dataclass
class UpstreamState:
    """Shared by all connections of one server: options, counters, scripted-failure memory."""

    api_key: str | None = None
    latency: float = 0.0  # seconds added to every POST answer
    requests: int = 0
    by_text: dict[str, int] = field(default_factory=dict)
    next_id: int = 0  # completion ids
    answered: int = 0  # x-request-id values
    last_priority: Any = None  # `priority` of the last completion request
    _auth: bytes | None = None

    def __post_init__(self) -> None:
        self._auth = None if self.api_key is None else b"Bearer " + self.api_key.encode()

    def reset(self) -> None:
        self.requests = 0
        self.by_text.clear()
        self.last_priority = None


@dataclass(slots=True)
class Answer:
    status: int
    body: bytes
    headers: bytes = b""  # extra header lines, each ending in CRLF
    delay: float = 0.0
    drop: bool = False
    content_type: bytes = b"application/json"


def _error(status: int, message: str, type_: str, param: str | None, code: str | None) -> Answer:
    payload = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return Answer(status, orjson.dumps(payload))


def _text_of(content: Any) -> str:
    """Text of a message content: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and "text" in p
        )
    return "" if content is None else str(content)


def _words(text: str) -> int:
    return len(text.split())


def _embedding(text: str) -> list[float]:
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return [round(b / 127.5 - 1.0, 6) for b in digest]


def handle(
    state: UpstreamState, method: bytes, path: bytes, auth: bytes | None, body: bytes
) -> Answer:
    """The whole application: one request in, one `Answer` out. No I/O."""
    if b"?" in path:
        path = path.split(b"?", 1)[0]
    if method == b"GET":
        if path == b"/stats":
            stats = {
                "requests": state.requests,
                "by_text": state.by_text,
                "last_priority": state.last_priority,
            }
            return Answer(200, orjson.dumps(stats))
        if path == b"/health":
            return Answer(200, b"{}")
        if path == _MODELS_PATH or path == b"/models":
            if state._auth is not None and auth != state._auth:
                return _unauthorized()
            model = {"id": "echo", "object": "model", "created": 0, "owned_by": "backfill"}
            return Answer(200, orjson.dumps({"object": "list", "data": [model]}))
        return _error(
            404,
            f"Unknown path {path.decode(errors='replace')}",
            "invalid_request_error",
            None,
            "not_found",
        )
    if method != b"POST":
        return _error(405, "Method not allowed", "invalid_request_error", None, None)
    if path == b"/reset":
        state.reset()
        return Answer(200, b"{}")
    if path.startswith(b"/v1/"):
        path = path[3:]
    if path not in (b"/chat/completions", b"/completions", b"/embeddings"):
        return _error(
            404,
            f"Unknown path {path.decode(errors='replace')}",
            "invalid_request_error",
            None,
            "not_found",
        )
    state.requests += 1
    if state._auth is not None and auth != state._auth:
        return _unauthorized()
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _error(
            400,
            "We could not parse the JSON body of your request.",
            "invalid_request_error",
            None,
            None,
        )
    if not isinstance(request, dict):
        return _error(
            400, "The request body must be a JSON object.", "invalid_request_error", None, None
        )
    if path != b"/embeddings":
        state.last_priority = request.get("priority")
    try:
        if path == b"/chat/completions":
            return _chat(state, request)
        if path == b"/completions":
            return _completion(state, request)
        return _embeddings(state, request)
    except (KeyError, TypeError, AttributeError, IndexError) as exc:
        return _error(400, f"Invalid request: {exc!r}", "invalid_request_error", None, None)


def _unauthorized() -> Answer:
    return _error(
        401, "Incorrect API key provided.", "invalid_request_error", None, "invalid_api_key"
    )


def _script(state: UpstreamState, text: str) -> tuple[Answer | None, float]:
    """Count `text` and read its directives: (a failure to send instead, delay in seconds)."""
    seen = state.by_text.get(text, 0) + 1
    state.by_text[text] = seen
    delay = state.latency
    if "#" not in text:
        return None, delay
    failure: Answer | None = None
    for name, count, extra in _DIRECTIVE.findall(text):
        times = int(count) if count else None
        if name == "sleep":
            delay += (times or 0) / 1000.0
        elif name == "close":
            failure = Answer(0, b"", drop=True)
        elif name == "fail400":
            failure = _error(
                400,
                "This model's maximum context length is 8 tokens (scripted #fail400).",
                "invalid_request_error",
                "messages",
                "context_length_exceeded",
            )
        elif name == "fail500" and (times is None or seen <= times):
            failure = _error(
                500, "The server had an error (scripted #fail500).", "server_error", None, None
            )
        elif name == "fail429" and (times is None or seen <= times):
            failure = _error(
                429,
                "Rate limit reached (scripted #fail429).",
                "rate_limit_error",
                None,
                "rate_limit_exceeded",
            )
            failure.headers = b"Retry-After: " + (extra or "0").encode() + b"\r\n"
    if failure is not None:
        failure.delay = delay
    return failure, delay


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _chat(state: UpstreamState, request: dict[str, Any]) -> Answer:
    messages = request["messages"]
    if not isinstance(messages, list) or not messages:
        return _error(
            400, "'messages' must be a non-empty list.", "invalid_request_error", "messages", None
        )
    texts = [_text_of(m.get("content")) for m in messages]
    last = texts[-1]
    failure, delay = _script(state, last)
    if failure is not None:
        return failure
    reply = "echo: " + last
    state.next_id += 1
    if request.get("stream") is True:
        usage = _usage(sum(_words(t) for t in texts), _words(reply))
        return _sse(f"chatcmpl-{state.next_id}", request, reply, usage, chat=True, delay=delay)
    payload = {
        "id": f"chatcmpl-{state.next_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": _usage(sum(_words(t) for t in texts), _words(reply)),
    }
    return Answer(200, orjson.dumps(payload), delay=delay)


def _completion(state: UpstreamState, request: dict[str, Any]) -> Answer:
    prompt = request["prompt"]
    text = prompt if isinstance(prompt, str) else " ".join(str(p) for p in prompt)
    failure, delay = _script(state, text)
    if failure is not None:
        return failure
    reply = "echo: " + text
    state.next_id += 1
    if request.get("stream") is True:
        usage = _usage(_words(text), _words(reply))
        return _sse(f"cmpl-{state.next_id}", request, reply, usage, chat=False, delay=delay)
    payload = {
        "id": f"cmpl-{state.next_id}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": request.get("model"),
        "choices": [{"index": 0, "text": reply, "logprobs": None, "finish_reason": "stop"}],
        "usage": _usage(_words(text), _words(reply)),
    }
    return Answer(200, orjson.dumps(payload), delay=delay)


def _sse(
    id_: str,
    request: dict[str, Any],
    reply: str,
    usage: dict[str, int],
    *,
    chat: bool,
    delay: float,
) -> Answer:
    """The echo as Server-Sent Events: one word per chunk."""
    head = {"id": id_, "created": int(time.time()), "model": request.get("model")}
    events: list[dict[str, Any]] = []
    words = reply.split(" ")
    for i, word in enumerate(words):
        text = word if i == 0 else " " + word
        last = i == len(words) - 1
        finish = "stop" if last else None
        if chat:
            delta: dict[str, Any] = {"content": text}
            if i == 0:
                delta["role"] = "assistant"
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            events.append({**head, "object": "chat.completion.chunk", "choices": [choice]})
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            events.append({**head, "object": "text_completion", "choices": [choice]})
    options = request.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        kind = "chat.completion.chunk" if chat else "text_completion"
        events.append({**head, "object": kind, "choices": [], "usage": usage})
    body = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    return Answer(200, body, delay=delay, content_type=b"text/event-stream")


def _embeddings(state: UpstreamState, request: dict[str, Any]) -> Answer:
    raw = request["input"]
    inputs = [raw] if isinstance(raw, str) else [i if isinstance(i, str) else str(i) for i in raw]
    failure, delay = _script(state, raw if isinstance(raw, str) else " ".join(inputs))
    if failure is not None:
        return failure
    words = sum(_words(t) for t in inputs)
    payload = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _embedding(t)}
            for i, t in enumerate(inputs)
        ],
        "model": request.get("model"),
        "usage": {"prompt_tokens": words, "total_tokens": words},
    }
    return Answer(200, orjson.dumps(payload), delay=delay)


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
                answer = _error(400, "Invalid HTTP request", "invalid_request_error", None, None)
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
