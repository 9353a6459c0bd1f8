"""The governor's reference peak: the day's highest, kept across restarts with the time it was
seen, read back at start as the reference's floor until it is a day old, ignored when older."""

from __future__ import annotations

import asyncio

import pytest

from backfill.dispatch.dispatcher import Dispatcher
from backfill.dispatch.governor import PEAK_SAVE_SECONDS, Governor
from backfill.dispatch.policy import Decision, GovernorPolicy, PolicyConfig
from backfill.dispatch.signals import EngineLoad, RealtimeStats, Signals
from backfill.engines.base import EngineReply
from backfill.settings import ModelConfig
from backfill.store.memory import MemoryStore

WALL = 1_800_000_000.0
WINDOW = 60.0
DAY = 600.0  # the policy's memory of the peak, seconds


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
    policy = GovernorPolicy(PolicyConfig(ceiling=512, window=WINDOW, day=DAY))
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


def test_the_days_peak_is_saved_and_kept_through_the_quiet_hours() -> None:
    store = MemoryStore()
    clock = [0.0]
    gov, fake = governor(store, clock)
    fake.running = 40.0  # real time the gateway does not see: the engine shows it
    asyncio.run(ticks(gov, clock, 20 * 10))
    saved = store.governor_peak("m")
    assert saved is not None and saved.reference >= 35
    fake.running = 3.0  # the quiet hours: the peak stays what the day saw
    asyncio.run(ticks(gov, clock, int((WINDOW + 2 * PEAK_SAVE_SECONDS) * 10)))
    last = store.governor_peak("m")
    assert last is not None and last.reference == saved.reference
    assert last.saved_at > saved.saved_at  # saved again (the live day's figure: stamped now)
    asyncio.run(ticks(gov, clock, int(DAY * 10)))  # a day later the peak is the quiet one
    assert store.governor_peak("m").reference < 3  # type: ignore[union-attr]


def test_nothing_is_saved_before_real_time_was_seen() -> None:
    store = MemoryStore()
    clock = [0.0]
    gov, _ = governor(store, clock)
    asyncio.run(ticks(gov, clock, int(2 * PEAK_SAVE_SECONDS * 10)))
    assert store.governor_peak("m") is None


def test_a_fresh_start_plans_against_the_stored_peak_until_it_is_a_day_old() -> None:
    store = MemoryStore()
    store.save_governor_peak("m", 40.0, WALL - 100)  # seen 100 s before the start
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
    later = asyncio.run(ticks(gov, clock, int((DAY - 100 - 5) * 10)))
    assert later[-1].reference == 40.0  # still inside the day it was seen in
    # saved again meanwhile with the time it was seen, not refreshed: it still ages out
    kept = store.governor_peak("m")
    assert kept is not None and kept.reference == 40.0
    assert kept.saved_at == pytest.approx(WALL - 100, abs=0.2)
    gone = asyncio.run(ticks(gov, clock, int((5 + PEAK_SAVE_SECONDS) * 10)))
    assert gone[-1].reference < 10  # a day old: the live quantile again
    assert store.governor_peak("m").reference < 10  # type: ignore[union-attr]


def test_a_peak_older_than_a_day_is_not_used() -> None:
    store = MemoryStore()
    store.save_governor_peak("m", 40.0, WALL - DAY - 1)
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


def test_the_policy_plans_against_the_days_peak_not_the_windows() -> None:
    p = GovernorPolicy(PolicyConfig(ceiling=512, window=WINDOW, day=DAY))
    p.seed_reference(30.0, age=100)

    def tick(now: float, load: float) -> Decision:
        engine = EngineLoad(running=load, waiting=0.0, kv_usage=0.1, tpot=0.01)
        return p.decide(
            Signals(
                now=now, rt_in_flight=int(load), rt_arrivals=0, batch_in_flight=0, engine=engine
            )
        )

    assert tick(0.1, 50).reference == 50  # the live quantile above the seed wins
    assert tick(WINDOW - 1, 2).reference == 50
    quiet = tick(WINDOW + 70, 2)  # the window's peak is 2; the day's (3 ticks) is 50
    assert quiet.reference == 50 and p.live_reference == 2
    assert p.day_peak(WINDOW + 70) == (50.0, 0.0)  # the live day's, not the seed
    for i in range(200):  # the day's 98th percentile: 50 is 1 of 203 ticks now
        tick(WINDOW + 71 + i, 2)
    assert tick(WINDOW + 300, 2).reference == 30  # the seed (seen 100 s before 0.1) is higher
    assert p.day_peak(WINDOW + 300) == (30.0, pytest.approx(WINDOW + 300 + 100 - 0.1))
    assert tick(DAY - 100 + 10, 2).reference == 2  # the seed a day old: forgotten


def test_a_seed_older_than_the_day_is_ignored() -> None:
    p = GovernorPolicy(PolicyConfig(ceiling=512, window=WINDOW, day=DAY))
    p.seed_reference(30.0, age=DAY + 1)
    engine = EngineLoad(running=2.0, waiting=0.0, kv_usage=0.1, tpot=0.01)
    d = p.decide(Signals(now=1.0, rt_in_flight=2, rt_arrivals=0, batch_in_flight=0, engine=engine))
    assert d.reference == 2
