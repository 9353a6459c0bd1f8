"""Dispatcher and Window over a deterministic fake engine: limits, retries, outcomes."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from polling import poll_async

from backfill.dispatch import Dispatcher, Outcome, Window
from backfill.dispatch.policy import Decision
from backfill.domain.retry import RetryPolicy
from backfill.engines.base import EngineReply
from backfill.errors import EngineError, EngineUnavailable

T = TypeVar("T")
CHAT = "/v1/chat/completions"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout=10))


class FakeEngine:
    """Answers from a per-request script: `body["script"]` lists, per attempt, a status, a
    `(status, retry_after)` pair, "down" (EngineUnavailable), "timeout", or "broken" (EngineError).
    With `gated=True` every call waits until the test releases it."""

    model = "fake"
    endpoints = frozenset({CHAT})

    def __init__(self, *, gated: bool = False, yields: int = 0) -> None:
        self.gated = gated
        self.yields = yields
        self.active = 0
        self.max_active = 0
        self.calls: list[str] = []
        self.gates: list[asyncio.Future[None]] = []
        self.attempts: dict[str, int] = {}

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def release(self, n: int = 1) -> None:
        opened = 0
        for gate in self.gates:
            if not gate.done() and opened < n:
                gate.set_result(None)
                opened += 1
        assert opened == n, f"only {opened} calls were waiting"

    async def send(
        self,
        endpoint: str,
        body: dict[str, Any],
        *,
        timeout: float | None = None,
    ) -> EngineReply:
        key = body["id"]
        attempt = self.attempts.get(key, 0)
        self.attempts[key] = attempt + 1
        self.calls.append(key)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.gated:
                gate = asyncio.get_running_loop().create_future()
                self.gates.append(gate)
                await gate
            for _ in range(self.yields):
                await asyncio.sleep(0)
            script = body.get("script", [200])
            step = script[min(attempt, len(script) - 1)]
            if step == "down":
                raise EngineUnavailable("connection refused", code="upstream_unavailable")
            if step == "timeout":
                raise EngineUnavailable("too slow", code="request_timeout")
            if step == "broken":
                raise EngineError("engine crashed", code="engine_crashed")
            status, retry_after = step if isinstance(step, tuple) else (step, None)
            return EngineReply(status, f'{{"n": {attempt}}}'.encode(), retry_after, f"req-{key}")
        finally:
            self.active -= 1


async def release_until_done(engine: FakeEngine, tasks: list[asyncio.Task[Outcome]]) -> None:
    """Let every gated call through, as they come, until all `tasks` are done."""
    while not all(t.done() for t in tasks):
        waiting = sum(1 for g in engine.gates if not g.done())
        if waiting:
            engine.release(waiting)
        await asyncio.sleep(0)


class RecordingSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(0)


def make(
    engine: FakeEngine, *, limit: int = 4, attempts: int = 3, sleep: Any = None, **kw: Any
) -> tuple[Dispatcher, RecordingSleep]:
    recorder = RecordingSleep()
    policy = RetryPolicy(attempts=attempts, base_delay=0.01, max_delay=0.05, jitter="none")
    dispatcher = Dispatcher(
        engine,
        max_concurrency=limit,
        policy=policy,
        sleep=sleep or recorder,
        rand=lambda: 0.5,
        **kw,
    )
    return dispatcher, recorder


def test_success_is_one_attempt() -> None:
    engine = FakeEngine()
    dispatcher, sleeps = make(engine)
    outcome = run(dispatcher.run(CHAT, {"id": "a"}))
    assert outcome == Outcome(200, b'{"n": 0}', "req-a", attempts=1)
    assert outcome.ok and not outcome.is_transport_error
    assert sleeps.delays == []
    assert (dispatcher.stats.sent, dispatcher.stats.succeeded, dispatcher.stats.failed) == (1, 1, 0)


def test_concurrency_limit_never_exceeded() -> None:
    engine = FakeEngine(yields=3)
    dispatcher, _ = make(engine, limit=5)

    async def scenario() -> list[Outcome]:
        return await asyncio.gather(*(dispatcher.run(CHAT, {"id": str(i)}) for i in range(60)))

    outcomes = run(scenario())
    assert all(o.status == 200 for o in outcomes)
    assert engine.max_active == 5
    assert dispatcher.in_flight == 0 and dispatcher.stats.in_flight == 0
    assert dispatcher.stats.sent == 60


def test_set_limit_grows_and_shrinks() -> None:
    engine = FakeEngine(gated=True)
    dispatcher, _ = make(engine, limit=4)

    async def scenario() -> None:
        tasks = [asyncio.create_task(dispatcher.run(CHAT, {"id": str(i)})) for i in range(20)]
        await poll_async(lambda: engine.active == 4, timeout=2, interval=0)
        for _ in range(5):
            await asyncio.sleep(0)
        assert engine.active == 4  # nobody else gets in

        dispatcher.set_limit(8)
        await poll_async(lambda: engine.active == 8, timeout=2, interval=0)
        assert dispatcher.limit == 8

        dispatcher.set_limit(2)  # running requests keep their slots
        assert engine.active == 8
        engine.release(6)
        await poll_async(lambda: engine.active == 2, timeout=2, interval=0)
        for _ in range(5):
            await asyncio.sleep(0)
        assert engine.active == 2  # finished ones were not replaced above the new limit
        assert len(engine.calls) == 8

        engine.release(1)  # one finishes: exactly one more is admitted
        await poll_async(lambda: len(engine.calls) == 9, timeout=2, interval=0)
        assert engine.active == 2

        dispatcher.set_limit(100)
        await release_until_done(engine, tasks)
        assert engine.max_active == 13  # 2 running + the 11 still waiting, all at once
        assert all(t.result().status == 200 for t in tasks)

    run(scenario())


def test_set_limit_rejects_zero() -> None:
    dispatcher, _ = make(FakeEngine())
    with pytest.raises(ValueError):
        dispatcher.set_limit(0)


def test_retries_then_success() -> None:
    engine = FakeEngine()
    dispatcher, sleeps = make(engine, attempts=4)
    outcome = run(dispatcher.run(CHAT, {"id": "a", "script": [500, "down", 503, 200]}))
    assert outcome.status == 200
    assert outcome.body == b'{"n": 3}'
    assert outcome.attempts == 4
    assert sleeps.delays == [0.01, 0.02, 0.04]  # base 0.01, doubling, no jitter
    stats = dispatcher.stats
    assert (stats.sent, stats.retried, stats.transport_errors) == (4, 3, 1)
    assert (stats.succeeded, stats.failed) == (1, 0)


def test_client_errors_are_not_retried() -> None:
    engine = FakeEngine()
    dispatcher, sleeps = make(engine)
    outcome = run(dispatcher.run(CHAT, {"id": "a", "script": [400, 200]}))
    assert outcome.status == 400
    assert outcome.body == b'{"n": 0}'
    assert outcome.attempts == 1 and not outcome.ok
    assert engine.calls == ["a"] and sleeps.delays == []
    assert dispatcher.stats.failed == 1


def test_final_server_error_after_attempts_is_a_reply() -> None:
    dispatcher, sleeps = make(FakeEngine(), attempts=3)
    outcome = run(dispatcher.run(CHAT, {"id": "a", "script": [500, 502, 503, 200]}))
    assert outcome.status == 503
    assert outcome.request_id == "req-a"
    assert outcome.attempts == 3
    assert len(sleeps.delays) == 2


def test_transport_failures_exhausted() -> None:
    dispatcher, _ = make(FakeEngine(), attempts=3)
    outcome = run(dispatcher.run(CHAT, {"id": "a", "script": ["down", "down", "timeout"]}))
    assert outcome.is_transport_error and outcome.status is None
    assert outcome.error_code == "request_timeout"  # the last attempt's reason
    assert outcome.message == "too slow"
    assert outcome.body == b""
    assert outcome.attempts == 3
    assert dispatcher.stats.failed == 1 and dispatcher.stats.transport_errors == 3


def test_engine_error_is_final() -> None:
    engine = FakeEngine()
    dispatcher, _ = make(engine)
    outcome = run(dispatcher.run(CHAT, {"id": "a", "script": ["broken", 200]}))
    assert outcome.error_code == "engine_crashed"
    assert engine.calls == ["a"]


def test_retry_after_honoured() -> None:
    dispatcher, sleeps = make(FakeEngine())
    outcome = run(dispatcher.run(CHAT, {"id": "a", "script": [(429, 0.25), 200]}))
    assert outcome.status == 200
    assert sleeps.delays == [0.25]


def test_backoff_sleep_does_not_hold_a_slot() -> None:
    engine = FakeEngine()

    async def scenario() -> None:
        wake = asyncio.Event()

        async def sleep(seconds: float) -> None:
            await wake.wait()

        dispatcher, _ = make(engine, limit=1, sleep=sleep)
        first = asyncio.create_task(dispatcher.run(CHAT, {"id": "a", "script": [503, 200]}))
        await poll_async(
            lambda: engine.calls == ["a"] and dispatcher.in_flight == 0, timeout=2, interval=0
        )
        # "a" is sleeping before its retry; with limit 1, "b" must still get through.
        second = await dispatcher.run(CHAT, {"id": "b"})
        assert second.status == 200
        assert not first.done()
        wake.set()
        assert (await first).attempts == 2

    run(scenario())


def test_window_cancelled_waiter_does_not_leak_a_slot() -> None:
    async def scenario() -> None:
        window = Window(1)
        await window.acquire()
        waiter = asyncio.create_task(window.acquire())
        await poll_async(lambda: window.waiting == 1, timeout=2, interval=0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        window.release()
        assert window.in_flight == 0
        await asyncio.wait_for(window.acquire(), 1)  # the slot is free again
        assert window.in_flight == 1

    run(scenario())


def test_window_cancelled_after_handoff_passes_slot_on() -> None:
    async def scenario() -> None:
        window = Window(1)
        await window.acquire()
        first = asyncio.create_task(window.acquire())
        second = asyncio.create_task(window.acquire())
        await poll_async(lambda: window.waiting == 2, timeout=2, interval=0)
        window.release()  # handed to `first`...
        first.cancel()  # ...which is cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await first
        await asyncio.wait_for(second, 1)
        assert window.in_flight == 1

    run(scenario())


def long_prompt(key: str, words: int) -> dict[str, Any]:
    return {"id": key, "prompt": " ".join(["w"] * words)}


def test_long_prompts_wait_while_short_ones_do_and_never_starve() -> None:
    engine = FakeEngine(gated=True)
    dispatcher, _ = make(engine, limit=2)
    dispatcher.set_defer(50)

    async def scenario() -> None:
        bodies = [long_prompt("short1", 10), long_prompt("short2", 10)]  # fill the window
        bodies += [long_prompt("long1", 200), long_prompt("short3", 10)]
        bodies += [long_prompt("long2", 200), long_prompt("short4", 10)]
        tasks = [asyncio.create_task(dispatcher.run(CHAT, body)) for body in bodies]
        await poll_async(lambda: engine.active == 2, timeout=2, interval=0)
        assert engine.calls == ["short1", "short2"]  # the long ones hold no slot
        assert dispatcher.stats.deferred == 2
        engine.release(2)
        await poll_async(lambda: len(engine.calls) == 4, timeout=2, interval=0)
        assert engine.calls[2:] == ["short3", "short4"]
        engine.release(1)  # room and nobody else waiting: the oldest long one goes
        await poll_async(lambda: len(engine.calls) == 5, timeout=2, interval=0)
        assert engine.calls[4] == "long1"
        for _ in range(5):
            await asyncio.sleep(0)
        assert engine.active == 2 and dispatcher.stats.deferred == 1  # not above the limit
        engine.release(2)
        await poll_async(lambda: len(engine.calls) == 6, timeout=2, interval=0)
        engine.release(1)
        outcomes = await asyncio.gather(*tasks)
        assert [o.status for o in outcomes] == [200] * 6
        assert dispatcher.stats.deferred == 0

    run(scenario())


def test_turning_deferral_off_lets_every_long_prompt_go() -> None:
    engine = FakeEngine(gated=True)
    dispatcher, _ = make(engine, limit=4)
    dispatcher.set_defer(50)

    async def scenario() -> None:
        shorts = [
            asyncio.create_task(dispatcher.run(CHAT, long_prompt(f"s{i}", 5))) for i in range(6)
        ]
        longs = [
            asyncio.create_task(dispatcher.run(CHAT, long_prompt(f"l{i}", 99))) for i in range(3)
        ]
        # one request of a batch past the middle of its window does not wait
        urgent = asyncio.create_task(dispatcher.run(CHAT, long_prompt("u", 99), defer_until=0.0))
        await poll_async(lambda: engine.active == 4, timeout=2, interval=0)
        assert dispatcher.stats.deferred == 3
        engine.release(3)
        await poll_async(lambda: len(engine.calls) == 7, timeout=2, interval=0)
        assert set(engine.calls[4:7]) == {"s4", "s5", "u"}
        assert dispatcher.stats.deferred == 3
        dispatcher.set_defer(None)  # real time went quiet
        assert dispatcher.stats.deferred == 0
        await release_until_done(engine, [*shorts, *longs, urgent])
        assert sorted(engine.calls[7:]) == ["l0", "l1", "l2"]
        assert engine.max_active == 4

    run(scenario())


def test_a_cancelled_long_prompt_leaves_the_queue() -> None:
    engine = FakeEngine(gated=True)
    dispatcher, _ = make(engine, limit=1)
    dispatcher.set_defer(50)

    async def scenario() -> None:
        short = asyncio.create_task(dispatcher.run(CHAT, long_prompt("s", 5)))
        parked = asyncio.create_task(dispatcher.run(CHAT, long_prompt("l", 99)))
        await poll_async(
            lambda: engine.active == 1 and dispatcher.stats.deferred == 1, timeout=2, interval=0
        )
        parked.cancel()
        with pytest.raises(asyncio.CancelledError):
            await parked
        assert dispatcher.stats.deferred == 0
        engine.release(1)
        assert (await short).status == 200
        later = asyncio.create_task(dispatcher.run(CHAT, long_prompt("l2", 99)))
        # room, nobody waiting: it goes
        await poll_async(lambda: engine.active == 1, timeout=2, interval=0)
        engine.release(1)
        assert (await later).status == 200
        assert engine.calls == ["s", "l2"]

    run(scenario())


def test_a_deferred_long_prompt_stops_waiting_at_its_deadline() -> None:
    engine = FakeEngine(gated=True)
    now = [1000.0]
    dispatcher, _ = make(engine, limit=1, wall=lambda: now[0])
    dispatcher.set_defer(50)

    async def scenario() -> None:
        shorts = [
            asyncio.create_task(dispatcher.run(CHAT, long_prompt(f"s{i}", 5))) for i in range(3)
        ]
        await poll_async(lambda: engine.active == 1, timeout=2, interval=0)
        late = asyncio.create_task(dispatcher.run(CHAT, long_prompt("l", 99), defer_until=1010.0))
        await poll_async(lambda: dispatcher.stats.deferred == 1, timeout=2, interval=0)
        engine.release(1)
        await poll_async(lambda: engine.calls == ["s0", "s1"], timeout=2, interval=0)
        assert dispatcher.stats.deferred == 1  # short ones still wait: it waits too
        now[0] = 1010.0  # its batch reached the middle of its window
        engine.release(1)
        await poll_async(lambda: len(engine.calls) == 3, timeout=2, interval=0)
        assert dispatcher.stats.deferred == 0
        assert engine.calls == ["s0", "s1", "s2"]  # in the window's queue now, first come first
        engine.release(1)
        await poll_async(lambda: engine.calls[-1] == "l", timeout=2, interval=0)
        engine.release(1)
        assert all(o.status == 200 for o in await asyncio.gather(*shorts, late))

    run(scenario())


def test_shed_requests_go_again_without_using_an_attempt() -> None:
    engine = FakeEngine(gated=True)
    dispatcher, _ = make(engine, limit=3, attempts=1)  # any failure would be final

    async def scenario() -> None:
        tasks = [asyncio.create_task(dispatcher.run(CHAT, {"id": f"r{i}"})) for i in range(3)]
        await poll_async(lambda: engine.active == 3, timeout=2, interval=0)
        dispatcher.apply(Decision(limit=1, shed=2))  # the governor's one call
        await poll_async(
            lambda: dispatcher.stats.shed == 2 and engine.active == 1, timeout=2, interval=0
        )
        assert dispatcher.limit == 1 and dispatcher.waiting == 2
        await release_until_done(engine, tasks)
        outcomes = [t.result() for t in tasks]
        assert [(o.status, o.attempts) for o in outcomes] == [(200, 1)] * 3
        assert sorted(engine.calls[3:]) == ["r1", "r2"]  # the most recent ones went again
        stats = dispatcher.stats
        assert (stats.sent, stats.retried, stats.failed, stats.succeeded) == (5, 0, 0, 3)

    run(scenario())


def test_a_shed_request_cancelled_by_someone_else_too_gives_up() -> None:
    engine = FakeEngine(gated=True)
    dispatcher, _ = make(engine, limit=2)

    async def scenario() -> None:
        task = asyncio.create_task(dispatcher.run(CHAT, {"id": "a"}))
        await poll_async(lambda: engine.active == 1, timeout=2, interval=0)
        assert dispatcher.shed(5) == 1
        task.cancel()  # a batch cancel at the same moment
        with pytest.raises(asyncio.CancelledError):
            await task
        assert dispatcher.stats.shed == 0 and dispatcher.in_flight == 0
        assert engine.calls == ["a"]

    run(scenario())


def test_stopped_holds_back_the_next_attempt_right_before_the_engine() -> None:
    engine = FakeEngine()
    dispatcher, _ = make(engine, attempts=3)
    calls = engine.calls

    async def scenario() -> None:
        never = await dispatcher.run(CHAT, {"id": "n"}, stopped=lambda: True)
        assert not never.sent and never.attempts == 0 and calls == []
        retried = {"id": "r", "script": [500, 200]}
        once = await dispatcher.run(CHAT, retried, stopped=lambda: len(calls) >= 1)
        assert not once.sent and once.attempts == 1 and calls == ["r"]
        stats = dispatcher.stats
        assert (stats.sent, stats.retried, stats.in_flight, dispatcher.in_flight) == (1, 0, 0, 0)

    run(scenario())


def test_apply_moves_limit_and_deferral_and_in_hand_follows() -> None:
    dispatcher, _ = make(FakeEngine(), limit=20)
    assert dispatcher.in_hand() == 20 and dispatcher.defer_over is None
    dispatcher.apply(Decision(limit=5, pace=1.2, burst=1024.0, defer_over=100.0))
    assert dispatcher.limit == 5 and dispatcher.defer_over == 100.0
    assert dispatcher.in_hand() == 40  # long prompts may wait: twice the window in hand
    dispatcher.apply(Decision(limit=20, idle=True))  # idle: no pacing, no deferral
    assert dispatcher.limit == 20 and dispatcher.defer_over is None
    assert dispatcher.in_hand() == 40  # deferral comes back with real time
    assert make(FakeEngine(), limit=4)[0].in_hand() == 16  # never fewer than 16


def test_engine_time_sums_every_attempt() -> None:
    """The usage ledger's engine time: each attempt from the engine call to its answer or its
    failure, added up (here a clock that moves 1 s per reading: 1 s per attempt)."""
    engine = FakeEngine()
    dispatcher, _ = make(engine)
    ticks = iter(range(1000))
    dispatcher._clock = lambda: float(next(ticks))
    outcome = run(dispatcher.run(CHAT, {"id": "t", "script": ["down", 500, 200]}))
    assert (outcome.status, outcome.attempts, outcome.engine_seconds) == (200, 3, 3.0)
    broken = run(dispatcher.run(CHAT, {"id": "b", "script": ["broken"]}))
    assert (broken.status, broken.engine_seconds) == (None, 1.0)
