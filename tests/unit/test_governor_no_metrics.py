"""Issue 13, part 3: protection without engine metrics, the governor on by default.

Synthetic signals and fake clocks; directions, not timings. Without engine metrics the policy
is dormant (the ceiling, nothing paced, deferred or shed) until the first real-time request
passes the gateway, so a batch alone runs as it did without a governor; with metrics it runs
from the first tick as before. At an engine that runs one request at a time, real-time TTFT
(not TPOT) is what batch requests inflate: the policy brings the batch to the floor and sheds
the rest, and lets it grow where TTFT does not move.

Failing before this change, checked by running this file (its two new imports stubbed) on
HEAD's `src/` unpacked with `git archive`: the batch-alone test fails on its first assertion
(HEAD's limits `[6, 6, 6, 6, 6]`: the first `idle_after` seconds at 6 of 256 with no real time
at all); the TTFT tests fail as HEAD's `Signals` takes no TTFT (it never measured one: HEAD's
policy on the same `OneAtATime` engine without TTFT holds a limit of 6 and a real-time TTFT of
5.6 s, against 0.6 s here); the service test fails as HEAD started no governor for an upstream
without metrics or `priority` (`set() == {'plain'}`); the others fail on what HEAD did not
have (`Decision.dormant`, `Signals.rt_ttft`, the relay's TTFT); of those,
`test_with_engine_metrics_it_governs_from_the_first_tick_as_before` and
`test_with_engine_metrics_ttft_is_left_to_the_engine_figures` keep HEAD's behaviour with
metrics in place.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from backfill.api.context import RealtimeModel
from backfill.api.realtime import Answer, Relay, _open_stream, _UsageRecorder
from backfill.dispatch.dispatcher import Dispatcher
from backfill.dispatch.governor import RESCRAPE_SECONDS, Governor
from backfill.dispatch.policy import Decision, GovernorPolicy, PolicyConfig
from backfill.dispatch.signals import EngineLoad, RealtimeStats, Signals
from backfill.domain.records import Project
from backfill.engines.base import EngineReply, StreamReply
from backfill.service import Service
from backfill.settings import ModelConfig, Settings

CEILING = 256


def policy(**kw: Any) -> GovernorPolicy:
    return GovernorPolicy(PolicyConfig(ceiling=CEILING, window=60.0, idle_after=2.0, **kw))


def quiet(now: float, batch: int, engine: EngineLoad | None = None) -> Signals:
    return Signals(now=now, rt_in_flight=0, rt_arrivals=0, batch_in_flight=batch, engine=engine)


# -- dormant until real time comes ----------------------------------------------------------


def test_a_batch_alone_keeps_the_ceiling_from_the_first_tick_without_engine_metrics() -> None:
    p = policy()
    decisions = [p.decide(quiet(0.1 * i, CEILING)) for i in range(1, 600)]
    assert all(d.limit == CEILING for d in decisions), [d.limit for d in decisions[:5]]
    assert all(d.shed == 0 and d.pace is None and d.defer_over is None for d in decisions)
    assert all(d.dormant and d.idle for d in decisions)


def test_the_first_real_time_request_wakes_it_and_it_yields_at_once() -> None:
    p = policy()
    for i in range(1, 50):
        p.decide(quiet(0.1 * i, CEILING))
    woke = p.decide(
        Signals(now=5.0, rt_in_flight=1, rt_arrivals=1, batch_in_flight=CEILING)  # not streamed
    )
    assert not woke.dormant and not woke.idle
    assert woke.limit < CEILING / 4
    assert woke.shed == CEILING - woke.limit
    assert woke.pace is not None


def test_with_engine_metrics_it_governs_from_the_first_tick_as_before() -> None:
    p = policy()

    def engine(batch: int) -> EngineLoad:  # the engine runs our batch, nothing else
        return EngineLoad(running=float(batch), waiting=0.0, kv_usage=0.3)

    first = p.decide(quiet(0.1, CEILING, engine(CEILING)))
    assert not first.dormant and first.limit < CEILING  # real time may bypass the gateway
    later = [p.decide(quiet(0.1 * i, p.limit, engine(p.limit))) for i in range(2, 60)]
    assert later[-1].idle and later[-1].limit == CEILING  # idle after `idle_after`, as before


def test_engine_metrics_appearing_later_wake_it_idle() -> None:
    p = policy()
    for i in range(1, 20):
        p.decide(quiet(0.1 * i, CEILING))
    engine = EngineLoad(running=CEILING, waiting=0.0, kv_usage=0.3)
    woke = p.decide(quiet(2.0, CEILING, engine))
    assert not woke.dormant and woke.idle and woke.limit == CEILING


# -- TTFT without engine metrics --------------------------------------------------------------


@dataclass
class Waiting:
    arrived: float
    ahead: float  # batch work (in requests) still ahead of it at the engine


class OneAtATime:
    """An engine without metrics that runs one request at a time, first come first served
    (llama-cpp-python's server): a real-time request waits for the batch requests ahead of
    it; batch requests take `service` seconds each, a real-time prefill `prefill`. The batch
    in flight follows the limit (the worker keeps the window full; a shed takes the excess,
    and a request sent after a real-time one queues behind it)."""

    def __init__(self, p: GovernorPolicy, *, service: float = 1.0, prefill: float = 0.02) -> None:
        self.policy = p
        self.service = service
        self.prefill = prefill
        self.now = 0.0
        self.batch = CEILING
        self.waiting: list[Waiting] = []
        self.ttfts: list[float] = []

    def tick(self, arrive: bool) -> Decision:
        self.now += 0.1
        done: list[float] = []
        for w in self.waiting:
            w.ahead = min(w.ahead, self.batch) - 0.1 / self.service
            if w.ahead <= 0:
                done.append(self.now - w.arrived + self.prefill)
        self.waiting = [w for w in self.waiting if w.ahead > 0]
        if arrive:  # the running batch request is half done on average
            self.waiting.append(Waiting(self.now, max(0.0, self.batch - 0.5)))
        self.ttfts += done
        decision = self.policy.decide(
            Signals(
                now=self.now,
                rt_in_flight=len(self.waiting),
                rt_arrivals=int(arrive),
                batch_in_flight=self.batch,
                rt_ttft=tuple(done),
                rt_awaiting=len(self.waiting),
                rt_waited=self.now - self.waiting[0].arrived if self.waiting else 0.0,
            )
        )
        self.batch = decision.limit
        return decision

    def run(self, ticks: int, every: int) -> list[Decision]:
        """A real-time request every `every` ticks (0: none)."""
        return [self.tick(every > 0 and i % every == 0) for i in range(ticks)]


def test_real_time_queued_behind_the_batch_brings_it_to_the_floor() -> None:
    engine = OneAtATime(policy())
    engine.run(30, every=0)
    assert engine.batch == CEILING  # dormant
    woke = engine.tick(arrive=True)
    assert woke.limit == 1 and woke.shed == CEILING - 1  # a stream waits: the floor at once
    decisions = engine.run(600, every=10)  # one a second for a minute
    tail = decisions[300:]
    assert max(d.limit for d in tail) <= 2, [d.limit for d in tail]
    assert all(d.ttft_cap is not None and d.pace is None for d in decisions)  # no pacing
    assert sorted(engine.ttfts)[len(engine.ttfts) // 2] < 1.0  # ~ half a batch request


def test_ttft_that_does_not_grow_with_the_batch_lets_it_grow() -> None:
    """An engine with room for everything: TTFT is the prefill whatever the batch."""
    p = policy()
    now, batch = 0.0, CEILING
    limits = []
    for i in range(600):
        now += 0.1
        arrive = i % 5 == 0
        d = p.decide(
            Signals(
                now=now,
                rt_in_flight=int(arrive),
                rt_arrivals=int(arrive),
                batch_in_flight=batch,
                rt_ttft=(0.05,) if arrive and i else (),
            )
        )
        batch = d.limit
        limits.append(d.limit)
    assert limits[-1] >= 5  # back up to the step-time model's target (~6), not held at 1
    assert p.guard.cap is not None and p.guard.cap >= limits[-1]


def test_after_real_time_stops_it_returns_to_the_ceiling_and_remembers_the_cap() -> None:
    engine = OneAtATime(policy())
    engine.run(10, every=0)
    engine.run(300, every=10)
    idle = engine.run(100, every=0)
    assert idle[-1].idle and idle[-1].limit == CEILING and not idle[-1].dormant
    back = engine.tick(arrive=True)
    assert back.limit <= 2 and back.shed == CEILING - back.limit


def test_with_engine_metrics_ttft_is_left_to_the_engine_figures() -> None:
    p = policy()
    engine = EngineLoad(running=10.0, waiting=0.0, kv_usage=0.3)
    for i in range(1, 100):
        d = p.decide(
            Signals(
                now=0.1 * i,
                rt_in_flight=1,
                rt_arrivals=1,
                batch_in_flight=p.limit,
                rt_ttft=(5.0 * i,),  # would alarm without metrics
                rt_awaiting=1,
                rt_waited=10.0,
                engine=engine if i % 10 else None,  # a scrape failing now and then changes nothing
            )
        )
        assert d.ttft_cap is None
    assert p.guard.cap is None


# -- the governor: scrapes, logs ------------------------------------------------------------


class NoMetrics:
    """An upstream whose `/metrics` is a 404 (`OpenAIEngine.load_metrics` gives None)."""

    model = "m"
    endpoints = frozenset({"/v1/chat/completions"})

    def __init__(self) -> None:
        self.scrapes = 0

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def send(self, endpoint: str, body: object, *, timeout: float | None = None) -> object:
        return EngineReply(200, b"{}")

    async def load_metrics(self) -> dict[str, float] | None:
        self.scrapes += 1
        return None


def test_an_upstream_without_metrics_is_asked_rarely_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = [0.0]
    fake = NoMetrics()
    dispatcher = Dispatcher.from_config(fake, ModelConfig(name="m", url="x", max_concurrency=64))  # type: ignore[arg-type]
    stats = RealtimeStats(clock=lambda: clock[0])
    gov = Governor(
        dispatcher, stats, GovernorPolicy(PolicyConfig(ceiling=64)), clock=lambda: clock[0]
    )

    async def ticks(n: int) -> list[Decision]:
        out = []
        for _ in range(n):
            clock[0] += 0.1
            out.append(await gov.tick())
        return out

    with caplog.at_level(logging.INFO, logger="backfill.governor"):
        first = asyncio.run(ticks(36_000))  # an hour of ticks
        assert all(d.dormant and d.limit == 64 for d in first)
        assert dispatcher.limit == 64
        assert fake.scrapes < 15 + 3600 / RESCRAPE_SECONDS
        stats.started()
        woke = asyncio.run(ticks(1))[0]
    assert not woke.dormant and woke.limit < 64
    messages = [r.getMessage() for r in caplog.records]
    assert sum("on the gateway's latencies alone" in m for m in messages) == 1, messages
    assert sum("dormant" in m for m in messages) == 1
    assert sum("awake (first real-time request)" in m for m in messages) == 1


class FlakyMetrics(NoMetrics):
    """An engine with vLLM's figures whose scrapes sometimes fail (a busy vLLM answering its
    `/metrics` late: the scrape times out), and that can stop serving them altogether."""

    def __init__(self) -> None:
        super().__init__()
        self.failing: set[int] = set()  # scrape numbers that fail
        self.gone = False

    async def load_metrics(self) -> dict[str, float] | None:
        self.scrapes += 1
        if self.gone or self.scrapes in self.failing:
            return None
        return {"vllm:num_requests_running": 3.0, "vllm:num_requests_waiting": 1.0}


def test_a_missed_scrape_keeps_the_last_reading_and_is_not_a_switch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = [0.0]
    fake = FlakyMetrics()
    fake.failing = {n for n in range(2, 400) if n % 7 == 0}  # one scrape in seven times out
    dispatcher = Dispatcher.from_config(fake, ModelConfig(name="m", url="x", max_concurrency=64))  # type: ignore[arg-type]
    gov = Governor(
        dispatcher,
        RealtimeStats(clock=lambda: clock[0]),
        GovernorPolicy(PolicyConfig(ceiling=64)),
        clock=lambda: clock[0],
    )

    async def ticks(n: int) -> list[EngineLoad | None]:
        out = []
        for _ in range(n):
            clock[0] += 0.1
            await gov.tick()
            out.append(gov.engine_load)
        return out

    with caplog.at_level(logging.INFO, logger="backfill.governor"):
        held = asyncio.run(ticks(300))
        assert all(load is not None and load.running == 3.0 for load in held)
        fake.gone = True  # the metrics are gone for good: after the hold, the gateway's alone
        after = asyncio.run(ticks(50))
    assert after[0] is not None and after[-1] is None
    messages = [r.getMessage() for r in caplog.records]
    assert sum("on the engine's metrics" in m for m in messages) == 1, messages
    assert sum("on the gateway's latencies alone" in m for m in messages) == 1, messages


# -- the gateway's TTFT ----------------------------------------------------------------------


class Streams:
    model = "m"
    endpoints = frozenset({"/v1/chat/completions"})

    def __init__(self, clock: list[float]) -> None:
        self.clock = clock

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def send(self, endpoint: str, body: object, *, timeout: float | None = None) -> object:
        return EngineReply(200, b"{}")

    @asynccontextmanager
    async def stream(
        self, endpoint: str, body: dict[str, Any], *, timeout: float | None = None
    ) -> AsyncIterator[StreamReply]:
        async def chunks() -> AsyncIterator[bytes]:
            self.clock[0] += 0.25  # the first bytes come 250 ms after the call
            yield b"data: {}\n\n"
            self.clock[0] += 1.0
            yield b"data: [DONE]\n\n"

        yield StreamReply(int(body.get("status", 200)), {}, chunks())


def test_the_gateway_times_each_streams_first_bytes() -> None:
    clock = [0.0]
    stats = RealtimeStats(clock=lambda: clock[0])
    target = RealtimeModel("m", Streams(clock), stats=stats)  # type: ignore[arg-type]

    async def one(status: int = 200) -> None:
        nowhere = _UsageRecorder(None, Project("p", "p"), "m", "/v1/chat/completions", 0)
        answer = await _open_stream(target, "/v1/chat/completions", {"status": status}, nowhere)
        if status == 200:
            assert isinstance(answer, Relay)
            assert stats.awaiting() == (1, 0.0)
            async for _ in answer.chunks:
                assert stats.awaiting()[0] == 0
        else:
            assert isinstance(answer, Answer)

    asyncio.run(one())
    assert stats.drain_ttfts() == [0.25]  # not the 1.25 s the stream lasted
    asyncio.run(one(status=500))  # an error answer has no first token
    assert stats.drain_ttfts() == [] and stats.awaiting() == (0, 0.0)


# -- the service: on by default ---------------------------------------------------------------


def test_a_governor_runs_for_every_model_unless_turned_off(tmp_path: Path) -> None:
    models = [
        ModelConfig(name="plain", url="http://127.0.0.1:9/v1"),  # no metrics, no priority
        ModelConfig(name="off", url="http://127.0.0.1:9/v1", governor=False),
    ]
    service = Service(Settings(data_dir=tmp_path, models=models))

    async def start() -> None:
        await service.start_engines()
        await service.close_engines()

    try:
        asyncio.run(start())
    finally:
        service.close()
    assert set(service.governors) == {"plain"}
