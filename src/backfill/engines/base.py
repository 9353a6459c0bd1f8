"""The one small interface every engine implements.

An engine knows nothing of batches, shards or storage: it gets the endpoint path
(`/v1/chat/completions`) and the JSON body of one request, and answers with the HTTP status
and the raw JSON body it produced. Transport failures (refused connection, timeout, reset) raise
`EngineUnavailable`; the dispatcher decides about retries. Engines rename the model if the
operator mapped a public name to a different upstream name.

Optional capabilities, checked with `isinstance(engine, StreamingEngine)`, `MetricsSource`,
`TokenCounting`, `ReplicaReporting` (runtime-checkable protocols, so in-process engines that
lack them need no change):
- `stream(endpoint, body, timeout=...)`: an async context manager yielding a `StreamReply`
  whose `chunks` are the upstream's response bytes as they arrive (SSE for `stream: true`);
  the real-time gateway relays them without buffering. Leaving the block closes the upstream
  connection, which aborts the request upstream.
- `load_metrics()`: the upstream's Prometheus metrics parsed to `{name: value}` (vLLM names),
  or None when it serves none; the governor polls it.
- `count_tokens(endpoint, body)`: the request's prompt tokens by the model's own tokenizer
  (in-process engines), or None when it cannot tell; the scheduler counts enqueued tokens
  with it at validation (from a thread), and estimates for engines without it.
- `replica_stats()`: per upstream replica, the router's figures (`engines/replicas.py`,
  a model with several `urls`); the composition root puts them on `/metrics` through this
  protocol, so nothing above `engines/` imports `ReplicaSet` (or aiohttp) for them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import orjson

from backfill.errors import error_body, status_type


@dataclass(frozen=True, slots=True)
class EngineReply:
    status: int
    body: bytes
    retry_after: float | None = None
    request_id: str | None = None


def error_reply(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> EngineReply:
    """An in-process engine's error answer, in the OpenAI error shape an HTTP upstream uses."""
    return EngineReply(status, orjson.dumps(error_body(message, status_type(status), param, code)))


class Engine(Protocol):
    #: public model name this engine serves
    model: str
    #: endpoints it can serve, e.g. {"/v1/chat/completions", "/v1/completions"}
    endpoints: frozenset[str]

    async def start(self) -> None:
        """Open pools, load weights. Called once, on the loop that will call `send`."""

    async def send(
        self,
        endpoint: str,
        body: dict[str, Any],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (a per-request budget)
    ) -> EngineReply:
        """Run one request. Raises `EngineUnavailable` on transport failure or timeout."""

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class StreamReply:
    """An upstream answer whose body is read as it arrives."""

    status: int
    headers: Mapping[str, str]
    chunks: AsyncIterator[bytes]


@runtime_checkable
class StreamingEngine(Protocol):
    def stream(
        self,
        endpoint: str,
        body: dict[str, Any],
        *,
        timeout: float | None = None,
    ) -> AbstractAsyncContextManager[StreamReply]:
        """Send one request and expose the answer's bytes as they arrive.

        Raises `EngineUnavailable` (on entering, or from `chunks`) on transport failure."""
        ...


@runtime_checkable
class MetricsSource(Protocol):
    async def load_metrics(self) -> dict[str, float] | None:
        """The upstream's metrics (vLLM names), or None when it has none."""
        ...


@runtime_checkable
class TokenCounting(Protocol):
    def count_tokens(self, endpoint: str, body: dict[str, Any]) -> int | None:
        """The prompt tokens of one request (None: not known, e.g. before `start()`)."""
        ...


@runtime_checkable
class ReplicaReporting(Protocol):
    def replica_stats(self) -> list[dict[str, Any]]:
        """Each replica's `url`, `in_flight`, `external`, `sent`, `errors`, `spilled` and
        `drained` (see `engines/routing.ReplicaState`)."""
        ...
