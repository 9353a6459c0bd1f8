"""`FunctionEngine`: an `Engine` whose answers come from a plain function, for unit tests.

A deterministic fake for unit tests of the scheduler, the worker and the dispatcher: no
sockets, no threads, no model; `send` calls the given function with `(endpoint, body)` and
answers what it returns, so a test states the behaviour it needs in a few lines instead of
writing an engine class. The function may be sync or async (an async one can wait on an event
the test sets, to hold requests in flight) and returns an `EngineReply`, or a `(status, body)`
pair whose body is bytes or anything `orjson` serializes.

It keeps the parts of the engine contract the dispatcher relies on: a `timeout` bounds the
call and becomes `EngineUnavailable(code="request_timeout")`, as in the real engines, and
exceptions the function raises (`EngineUnavailable` for a transport failure, say) go through
unchanged.

Never a product default: nothing in the package builds one, and it is not an engine kind. It
is also never the only proof that a feature works (DESIGN.md, Tests): the integration tier
runs the same flows against a real HTTP upstream, and `tests/local` the in-process engines.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeAlias

import orjson

from backfill.engines.base import EngineReply
from backfill.errors import EngineUnavailable

__all__ = ["Answer", "FunctionEngine", "Reply"]

#: what the function returns: a whole reply, or a status and a body (bytes, or JSON to encode)
Reply: TypeAlias = EngineReply | tuple[int, Any]
#: the function behind the engine: `(endpoint, body) -> Reply`, sync or async
Answer: TypeAlias = Callable[[str, dict[str, Any]], Reply | Awaitable[Reply]]

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


class FunctionEngine:
    """An engine for `model` that answers every request with `answer(endpoint, body)`.

    `calls` lists each `(endpoint, body)` sent, in order, for tests that check what reached
    the engine."""

    def __init__(
        self, answer: Answer, *, model: str = "fake", endpoints: Iterable[str] = ENDPOINTS
    ) -> None:
        self.model = model
        self.endpoints = frozenset(endpoints)
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._answer = answer

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def send(
        self,
        endpoint: str,
        body: dict[str, Any],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (a per-request budget, as in Engine)
    ) -> EngineReply:
        self.calls.append((endpoint, body))
        try:
            async with asyncio.timeout(timeout):
                result = self._answer(endpoint, body)
                reply: Reply = await result if inspect.isawaitable(result) else result
        except TimeoutError as exc:
            if timeout is None:
                raise
            raise EngineUnavailable(
                f"model {self.model!r} did not answer within {timeout:g}s", code="request_timeout"
            ) from exc
        return as_reply(reply)


def as_reply(reply: Reply) -> EngineReply:
    """An `EngineReply` as is; `(status, body)` with the body encoded unless it is bytes."""
    if isinstance(reply, EngineReply):
        return reply
    status, body = reply
    return EngineReply(status, body if isinstance(body, bytes) else orjson.dumps(body))
