"""The governor in process, driving a real dispatcher against the simulated vLLM server.

Batch load runs all along; real-time streams come in a burst and go. Directions only, polled
with deadlines (no timing assertions): the batch limit is high while real time is idle, falls
when the burst arrives (shedding batch requests, which are re-sent, never failed), and grows
back once the burst is over.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import pytest

from backfill.dispatch.dispatcher import Dispatcher
from backfill.dispatch.governor import Governor
from backfill.dispatch.policy import GovernorPolicy, PolicyConfig
from backfill.dispatch.signals import RealtimeStats
from backfill.engines.openai import OpenAIEngine
from backfill.settings import ModelConfig
from backfill.sim import SimProcess, start_sim

CHAT = "/v1/chat/completions"
CEILING = 400


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    with start_sim(speedup=10) as s:
        yield s


async def until(check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.05)


def test_governor_yields_to_a_real_time_burst_and_grows_back(sim: SimProcess) -> None:
    async def scenario() -> None:
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
        stats = RealtimeStats()
        policy = GovernorPolicy(
            PolicyConfig(ceiling=CEILING, window=30.0, idle_after=1.0, growth=0.3)
        )
        governor = Governor(dispatcher, stats, policy, interval=0.1)
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

        async def realtime_user(i: int) -> None:
            n = 0
            while burst_on.is_set():
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

        def limit() -> int:
            return dispatcher.limit

        workers = [asyncio.create_task(batch_worker(i)) for i in range(CEILING)]
        try:
            await until(lambda: bool(governor.history) and governor.history[-1][1].idle)
            await until(lambda: limit() >= 200)
            before = limit()

            burst_on.set()
            users = [asyncio.create_task(realtime_user(i)) for i in range(60)]
            await until(lambda: limit() < before / 2)
            await until(lambda: dispatcher.stats.shed > 0)
            await until(lambda: stats.in_flight >= 30)
            during = limit()
            assert during < before

            burst_on.clear()
            await asyncio.gather(*users)
            await until(lambda: limit() > during)
            await until(lambda: limit() >= 200)
        finally:
            stop.set()
            await loop_task
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            await engine.close()
        assert outcomes and all(status == 200 for status in outcomes)
        assert dispatcher.stats.failed == 0

    asyncio.run(scenario())
