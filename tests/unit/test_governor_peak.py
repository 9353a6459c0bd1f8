"""The governor's reference peak across restarts: saved once a whole window was watched, read
back at start as the reference's floor for the first window, ignored when older than a day."""

from __future__ import annotations

import asyncio

from backfill.dispatch.dispatcher import Dispatcher
from backfill.dispatch.governor import PEAK_MAX_AGE, PEAK_SAVE_SECONDS, Governor
from backfill.dispatch.policy import Decision, GovernorPolicy, PolicyConfig
from backfill.dispatch.signals import EngineLoad, RealtimeStats, Signals
from backfill.engines.base import EngineReply
from backfill.settings import ModelConfig
from backfill.store.memory import MemoryStore

WALL = 1_800_000_000.0
WINDOW = 60.0


class Busy:
    """An upstream with vLLM's figures: `running` real-time requests beside the batch."""

    model = "m"
    endpoints = frozenset({"/v1/chat/completions"})

    def __init__(self) -> None:
        self.running = 0.0

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def send(self, endpoint: str, body: object, *, timeout: float | None = None) -> object:
        return EngineReply(200, b"{}")

    async def load_metrics(self) -> dict[str, float] | None:
        return {"vllm:num_requests_running": self.running, "vllm:num_requests_waiting": 0.0}


def governor(store: MemoryStore, clock: list[float]) -> tuple[Governor, Busy]:
    fake = Busy()
    dispatcher = Dispatcher.from_config(fake, ModelConfig(name="m", url="x", max_concurrency=512))  # type: ignore[arg-type]
    policy = GovernorPolicy(PolicyConfig(ceiling=512, window=WINDOW))
    gov = Governor(
        dispatcher,
        RealtimeStats(clock=lambda: clock[0]),
        policy,
        clock=lambda: clock[0],
        peaks=store,
        wall_clock=lambda: WALL + clock[0],
    )
    return gov, fake


async def ticks(gov: Governor, clock: list[float], n: int) -> list[Decision]:
    out = []
    for _ in range(n):
        clock[0] += 0.1
        out.append(await gov.tick())
        await gov.save_peak()
    return out


def test_the_live_peak_is_saved_once_a_window_was_watched() -> None:
    store = MemoryStore()
    clock = [0.0]
    gov, fake = governor(store, clock)
    fake.running = 40.0  # real time the gateway does not see: the engine shows it
    asyncio.run(ticks(gov, clock, int(WINDOW * 10) - 20))
    assert store.governor_peak("m") is None  # a window not yet watched: nothing written
    asyncio.run(ticks(gov, clock, 40))
    saved = store.governor_peak("m")
    assert saved is not None and saved.reference >= 35
    fake.running = 0.0  # real time gone: a quiet window is not saved over the peak
    asyncio.run(ticks(gov, clock, int((WINDOW + PEAK_SAVE_SECONDS) * 10)))
    last = store.governor_peak("m")  # (saved while the peak was still in the window)
    assert last is not None and last.reference == saved.reference
    asyncio.run(ticks(gov, clock, int(3 * PEAK_SAVE_SECONDS * 10)))
    assert store.governor_peak("m") == last


def test_a_fresh_start_begins_from_the_stored_peak_for_one_window() -> None:
    store = MemoryStore()
    store.save_governor_peak("m", 40.0, WALL - 3600)
    clock = [0.0]
    gov, fake = governor(store, clock)
    fake.running = 5.0  # a valley at start
    assert asyncio.run(gov.restore_peak()) == 40.0
    first = asyncio.run(ticks(gov, clock, 10))
    assert all(d.reference == 40.0 for d in first)
    blind, blind_fake = governor(MemoryStore(), [0.0])  # the same start with nothing stored
    blind_fake.running = 5.0
    assert asyncio.run(blind.restore_peak()) is None
    blind_first = asyncio.run(ticks(blind, [0.0], 10))
    assert all(d.reference < 10 for d in blind_first)
    assert first[-1].limit > blind_first[-1].limit  # it fills the valley below the known peak
    later = asyncio.run(ticks(gov, clock, int(WINDOW * 10)))
    assert later[-1].reference < 10  # a whole window watched: the live quantile again


def test_a_peak_older_than_a_day_is_not_used() -> None:
    store = MemoryStore()
    store.save_governor_peak("m", 40.0, WALL - PEAK_MAX_AGE - 1)
    clock = [0.0]
    gov, fake = governor(store, clock)
    fake.running = 5.0
    assert asyncio.run(gov.restore_peak()) is None
    assert asyncio.run(ticks(gov, clock, 1))[0].reference < 10


def test_a_store_that_fails_is_skipped() -> None:
    class Broken(MemoryStore):
        def governor_peak(self, model: str) -> None:
            raise RuntimeError("down")

    clock = [0.0]
    gov, _ = governor(Broken(), clock)
    assert asyncio.run(gov.restore_peak()) is None
    assert asyncio.run(ticks(gov, clock, 1))[0].limit >= 1


def test_the_policy_seed_is_a_floor_only_during_the_first_window() -> None:
    p = GovernorPolicy(PolicyConfig(ceiling=512, window=WINDOW))
    p.seed_reference(30.0)

    def tick(now: float, load: float) -> Decision:
        engine = EngineLoad(running=load, waiting=0.0, kv_usage=0.1, tpot=0.01)
        return p.decide(
            Signals(
                now=now, rt_in_flight=int(load), rt_arrivals=0, batch_in_flight=0, engine=engine
            )
        )

    assert tick(0.1, 50).reference == 50  # the live quantile above the seed wins
    assert tick(WINDOW - 1, 2).reference == 50
    assert tick(WINDOW + 70, 2).reference == 2  # a window later: the seed is gone
