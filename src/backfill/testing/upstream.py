"""A real, fast, scriptable OpenAI-compatible upstream for tests and benchmarks.

    python -m backfill.testing.upstream --host 127.0.0.1 --port 0 [--api-key K] [--latency-ms X]

prints `READY <port>` once it listens. It speaks HTTP/1.1 on raw asyncio (the plumbing of
`backfill.testing.httpserver`: an `asyncio.Protocol` fed by `httptools`, on uvloop when
installed) rather than on a web framework, because benchmarks compare backfill's throughput
against it: it must not be the bottleneck, and it serves tens of thousands of small requests
per second on one core. This module carries out the answers of `backfill.testing.echo`
(delays, dropped connections, `x-request-id`) and holds the command line.

Endpoints: `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings` (echo answers with a
word-count `usage`), `/v1/responses` (the chat echo as a `Response` object, through
`backfill.domain.responses_api`), `/v1/moderations` (a spec-shaped result per input, flagged
when the text has `#flag`), `GET /v1/models`, `GET /stats`, `POST /reset`, `GET /health`.
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
a later request finishes first (`backfill.testing.httpserver.Reply`). Delays use
`loop.call_later`, never a task per request.
"""

from __future__ import annotations

import argparse
import asyncio

from backfill.testing.echo import UpstreamState, handle
from backfill.testing.httpserver import Reply, Request, announce, listen, port_of, response, run
from backfill.testing.process import UpstreamProcess, start_upstream

__all__ = ["EchoHandler", "UpstreamProcess", "UpstreamState", "main", "serve", "start_upstream"]


class EchoHandler:
    """`backfill.testing.echo` on the shared HTTP plumbing."""

    def __init__(self, state: UpstreamState) -> None:
        self.state = state
        self._loop = asyncio.get_running_loop()

    def handle(self, request: Request, reply: Reply) -> None:
        state = self.state
        answer = handle(state, request.method, request.url, request.authorization, request.body)
        if answer.drop:
            if answer.delay > 0:
                self._loop.call_later(answer.delay, reply.drop)
            else:
                reply.drop()
            return
        state.answered += 1
        headers = b"x-request-id: req-%d\r\n%s" % (state.answered, answer.headers)
        data = response(answer.status, answer.body, reply.keep_alive, answer.content_type, headers)
        if answer.delay > 0:
            self._loop.call_later(answer.delay, reply.end, data)
        else:
            reply.end(data)


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
    server = await listen(EchoHandler(state), host, port, backlog=backlog)
    return server, state


async def _main(args: argparse.Namespace) -> None:
    server, _ = await serve(args.host, args.port, api_key=args.api_key, latency_ms=args.latency_ms)
    async with server:
        await announce(port_of(server))


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
    run(_main(args), uvloop=not args.no_uvloop)


if __name__ == "__main__":
    main()
