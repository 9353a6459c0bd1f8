"""The governor in process, driving a real dispatcher against the simulated vLLM server.

Batch load runs all along; real-time streams come in a burst and go. Directions only, polled
with deadlines (no timing assertions): the batch limit is high while real time is idle, falls
when the burst arrives (shedding batch requests, which are re-sent, never failed), and grows
back once the burst is over.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from polling import poll_async

from backfill.dispatch.dispatcher import Dispatcher
from backfill.dispatch.governor import Governor
from backfill.dispatch.policy import GovernorPolicy, PolicyConfig
from backfill.dispatch.signals import RealtimeStats
from backfill.engines.base import EngineReply
from backfill.engines.openai import OpenAIEngine
from backfill.settings import ModelConfig
from backfill.sim import SimProcess, start_sim

CHAT = "/v1/chat/completions"
CEILING = 400


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    with start_sim(speedup=10) as s:
        yield s


async def governed(sim: SimProcess, **policy: object) -> tuple[OpenAIEngine, Dispatcher, Governor]:
    config = ModelConfig(
        name="llama",
        url=sim.url,
        upstream_name=sim.model_name,
        priority=True,
        max_concurrency=CEILING,
    )
    engine = OpenAIEngine(config)
    await engine.start()
    dispatcher = Dispatcher.from_config(engine, config, priority=10)
    settings = PolicyConfig(ceiling=CEILING, window=30.0, idle_after=1.0, growth=0.3, **policy)  # type: ignore[arg-type]
    governor = Governor(dispatcher, RealtimeStats(), GovernorPolicy(settings), interval=0.1)
    return engine, dispatcher, governor


async def realtime_user(
    engine: OpenAIEngine, stats: RealtimeStats, on: asyncio.Event, i: int
) -> None:
    """Streams short real-time requests at priority 0 while `on` is set."""
    n = 0
    while on.is_set():
        n += 1
        body = {
            "model": "llama",
            "messages": [{"role": "user", "content": f"rt {i} {n}"}],
            "max_tokens": 100,
            "stream": True,
            "priority": 0,
        }
        stats.started()
        try:
            async with engine.stream(CHAT, body) as reply:
                async for _ in reply.chunks:
                    pass
        finally:
            stats.ended()


async def shut_down(
    stop: asyncio.Event,
    governor_task: asyncio.Task[None],
    workers: list[asyncio.Task[None]],
    engine: OpenAIEngine,
) -> None:
    stop.set()
    await governor_task
    for w in workers:
        w.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    await engine.close()


def test_governor_yields_to_a_real_time_burst_and_grows_back(sim: SimProcess) -> None:
    async def scenario() -> None:
        engine, dispatcher, governor = await governed(sim)
        stats = governor.stats
        stop = asyncio.Event()
        loop_task = asyncio.create_task(governor.run(stop))
        burst_on = asyncio.Event()
        outcomes: list[int | None] = []

        async def batch_worker(i: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                body = {
                    "model": "llama",
                    "messages": [{"role": "user", "content": f"batch {i} {n} " + "w " * 100}],
                    "max_tokens": 300,
                }
                outcomes.append((await dispatcher.run(CHAT, body)).status)

        def limit() -> int:
            return dispatcher.limit

        workers = [asyncio.create_task(batch_worker(i)) for i in range(CEILING)]
        try:
            await poll_async(lambda: bool(governor.history) and governor.history[-1][1].idle)
            # it governs on the simulator's vLLM 0.32 metrics, not the gateway's latencies alone
            assert governor.engine_load is not None, governor.engine_missing
            await poll_async(lambda: limit() >= 200)
            before = limit()

            burst_on.set()
            users = [
                asyncio.create_task(realtime_user(engine, stats, burst_on, i)) for i in range(60)
            ]
            await poll_async(lambda: limit() < before / 2)
            await poll_async(lambda: dispatcher.stats.shed > 0)
            await poll_async(lambda: stats.in_flight >= 30)
            during = limit()
            assert during < before

            burst_on.clear()
            await asyncio.gather(*users)
            await poll_async(lambda: limit() > during)
            await poll_async(lambda: limit() >= 200)
        finally:
            await shut_down(stop, loop_task, workers, engine)
        assert outcomes and all(status == 200 for status in outcomes)
        assert dispatcher.stats.failed == 0

    asyncio.run(scenario())


def test_long_prompts_wait_while_real_time_is_active_then_run(sim: SimProcess) -> None:
    """Every tenth batch request has a long prompt. While real-time traffic streams, none of
    them is sent (short ones are always waiting) and they show as deferred; once real time
    is idle they all go, and every request succeeds."""

    async def scenario() -> None:
        engine, dispatcher, governor = await governed(sim, defer_over=128)
        stats = governor.stats
        sends: list[bool] = []  # per send to the engine: was the prompt long
        send = engine.send

        async def recording(endpoint: str, body: dict[str, Any], **kw: Any) -> EngineReply:
            sends.append("long" in body["messages"][0]["content"])
            return await send(endpoint, body, **kw)

        engine.send = recording  # type: ignore[method-assign]
        stop = asyncio.Event()
        loop_task = asyncio.create_task(governor.run(stop))
        realtime_on = asyncio.Event()
        realtime_on.set()
        outcomes: list[tuple[bool, int | None]] = []

        async def batch_worker(i: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                long = i % 10 == 0
                words = "w " * (400 if long else 20)
                text = f"{'long' if long else 'short'} {i} {n} {words}"
                body = {
                    "model": "llama",
                    "messages": [{"role": "user", "content": text}],
                    "max_tokens": 50,
                }
                outcomes.append((long, (await dispatcher.run(CHAT, body)).status))

        users = [
            asyncio.create_task(realtime_user(engine, stats, realtime_on, i)) for i in range(20)
        ]
        await poll_async(lambda: stats.in_flight >= 10)
        workers = [asyncio.create_task(batch_worker(i)) for i in range(CEILING)]
        try:
            await poll_async(lambda: dispatcher.stats.deferred >= 30)
            long_sends = sum(sends)
            short_done = sum(1 for long, _ in outcomes if not long)
            await poll_async(lambda: sum(1 for long, _ in outcomes if not long) >= short_done + 200)
            assert sum(sends) == long_sends  # no long prompt went while short ones waited

            realtime_on.clear()
            await asyncio.gather(*users)
            await poll_async(lambda: bool(governor.history) and governor.history[-1][1].idle)
            await poll_async(lambda: sum(1 for long, _ in outcomes if long) >= 40)
            assert sum(sends) > long_sends
        finally:
            await shut_down(stop, loop_task, workers, engine)
        assert all(status == 200 for _, status in outcomes)
        assert dispatcher.stats.failed == 0

    asyncio.run(scenario())
