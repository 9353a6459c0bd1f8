"""`backfill.testing.engine.FunctionEngine`, the unit tests' deterministic fake engine: it
answers with the given function and keeps the engine contract the dispatcher relies on."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from backfill.dispatch import Dispatcher
from backfill.domain.retry import RetryPolicy
from backfill.engines.base import EngineReply
from backfill.errors import EngineUnavailable
from backfill.testing.engine import FunctionEngine

CHAT = "/v1/chat/completions"


def test_function_engine_answers_with_the_function_sync_or_async() -> None:
    def sync(endpoint: str, body: dict[str, Any]) -> tuple[int, Any]:
        return (200, {"echo": body["x"]}) if body["x"] != "bad" else (400, b"{}")

    async def later(endpoint: str, body: dict[str, Any]) -> EngineReply:
        await asyncio.sleep(0)
        return EngineReply(503, b"{}", retry_after=1.0)

    async def main() -> None:
        engine = FunctionEngine(sync, model="m", endpoints={CHAT})
        assert (engine.model, engine.endpoints) == ("m", frozenset({CHAT}))
        reply = await engine.send(CHAT, {"x": "a"})
        assert (reply.status, orjson.loads(reply.body)) == (200, {"echo": "a"})
        assert (await engine.send(CHAT, {"x": "bad"})).status == 400
        assert engine.calls == [(CHAT, {"x": "a"}), (CHAT, {"x": "bad"})]
        assert await FunctionEngine(later).send(CHAT, {}) == EngineReply(503, b"{}", 1.0)

    asyncio.run(main())


def test_function_engine_keeps_the_timeout_contract_through_the_dispatcher() -> None:
    async def stuck(endpoint: str, body: dict[str, Any]) -> EngineReply:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def main() -> None:
        engine = FunctionEngine(stuck)
        with pytest.raises(EngineUnavailable) as info:
            await engine.send(CHAT, {}, timeout=0.01)
        assert info.value.code == "request_timeout"
        dispatcher = Dispatcher(engine, max_concurrency=1, policy=RetryPolicy(attempts=1))
        outcome = await dispatcher.run(CHAT, {}, timeout=0.01)
        assert outcome.is_transport_error and outcome.attempts == 1

    asyncio.run(main())
