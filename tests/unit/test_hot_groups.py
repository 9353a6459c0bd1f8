"""Hot prefix groups: the pure choice (`Lineup`, `HotGroups`, `WarmUp`) and, through a
`Dispatcher` over the deterministic `FunctionEngine`, the window's preference and the warm-up
gate (one request of a cold group first, the others released on its end, failure or cancel)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine
from itertools import islice
from typing import Any, TypeVar

import pytest
from polling import poll_async

from backfill.dispatch import Dispatcher, Outcome
from backfill.dispatch.hot_groups import NO_GROUP, HotGroups, Lineup, Verdict, WarmUp
from backfill.domain.retry import RetryPolicy
from backfill.testing.engine import FunctionEngine

T = TypeVar("T")
CHAT = "/v1/chat/completions"
A, B, C = b"A" * 32, b"B" * 32, b"C" * 32


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# -- HotGroups ---------------------------------------------------------------------------------
def test_a_group_is_hot_while_running_and_for_a_few_groups_after() -> None:
    hot = HotGroups(hot_recent=2, warm_recent=3)
    assert not hot and not hot.is_hot(A)
    hot.started(A)
    hot.started(A)
    hot.ended(A)
    assert hot.is_hot(A) and hot.running[A] == 1
    hot.ended(A)
    assert A not in hot.running and hot.is_hot(A)  # just finished
    for g in (B, C):
        hot.started(g)
        hot.ended(g)
    assert not hot.is_hot(A) and hot.is_hot(B) and hot.is_hot(C)  # only the last 2
    assert hot.is_warm(A)  # started within the last 3
    hot.started(b"D" * 32)
    assert not hot.is_warm(A)
    assert not hot.is_hot(None) and not hot.is_warm(None)


# -- Lineup ------------------------------------------------------------------------------------
def test_without_hot_groups_the_lineup_is_first_come_first_served() -> None:
    for hot in (None, HotGroups()):  # no tracker, or nothing hot
        lineup: Lineup[str] = Lineup(hot)
        for i, g in enumerate((A, B, C, A)):
            lineup.add(f"w{i}", g)
        assert [lineup.pop() for _ in range(4)] == ["w0", "w1", "w2", "w3"]
        with pytest.raises(IndexError):
            lineup.pop()


def test_the_oldest_waiter_of_a_hot_group_goes_first() -> None:
    hot = HotGroups()
    hot.started(B)
    lineup: Lineup[str] = Lineup(hot)
    for name, g in (("a1", A), ("none", None), ("b1", B), ("b2", B), ("a2", A)):
        lineup.add(name, g)
    assert lineup.pop() == "b1"
    assert lineup.passed("a1") == 1 and lineup.passed("none") == 1 and lineup.passed("a2") == 0
    assert lineup.pop() == "b2"
    assert lineup.pop() == "a1"  # no hot waiter left: the oldest
    assert lineup.preferred == 2


def test_a_waiter_is_passed_over_at_most_max_passes_times() -> None:
    hot = HotGroups()
    hot.started(A)
    lineup: Lineup[str] = Lineup(hot, max_passes=3, max_wait=1e9, clock=Clock())
    lineup.add("cold", B)
    order = []
    for i in range(6):
        lineup.add(f"hot{i}", A)  # a hot waiter keeps arriving
        order.append(lineup.pop())
    assert order[:4] == ["hot0", "hot1", "hot2", "cold"]  # passed 3 times, then first


def test_a_waiter_waiting_max_wait_seconds_goes_first() -> None:
    hot = HotGroups()
    hot.started(A)
    clock = Clock()
    lineup: Lineup[str] = Lineup(hot, max_passes=1000, max_wait=5.0, clock=clock)
    lineup.add("cold", B)
    clock.now = 1.0
    lineup.add("hot0", A)
    lineup.add("hot1", A)
    assert lineup.pop() == "hot0"
    clock.now = 5.0
    assert lineup.pop() == "cold"  # waited 5 s: before a hot one


def test_only_lookahead_waiters_are_looked_at() -> None:
    hot = HotGroups()
    hot.started(A)
    lineup: Lineup[str] = Lineup(hot, lookahead=2)
    for name, g in (("b", B), ("c", C), ("a", A)):
        lineup.add(name, g)
    assert lineup.pop() == "b"


def test_no_waiter_starves_under_random_traffic() -> None:
    """Random arrivals, groups and hot sets: whoever leaves was passed over at most
    `max_passes` times, never went past an aged waiter, and everyone leaves."""
    rng = random.Random(16)
    hot = HotGroups(hot_recent=2)
    k = 5
    lineup: Lineup[int] = Lineup(hot, max_passes=k, max_wait=1e9, clock=Clock(), lookahead=64)
    groups = [bytes([g]) * 32 for g in range(8)]
    added = left = 0
    passed: dict[int, int] = {}
    for step in range(30_000):
        if step < 10_000:  # a queue builds up, then drains
            for _ in range(rng.randint(0, 3)):
                lineup.add(added, rng.choice(groups))
                added += 1
        if rng.random() < 0.5:  # the hot set moves: a group runs and ends
            g = rng.choice(groups)
            hot.started(g)
            hot.ended(g)
        if lineup:
            ahead = {i: lineup.passed(i) for i in islice(lineup, 64)}
            who = lineup.pop()
            assert all(p < k for i, p in ahead.items() if i < who), "went past an aged waiter"
            passed[who] = ahead[who]
            left += 1
    assert not lineup and left == added
    assert max(passed.values()) == k  # the bound is reached, never passed
    assert sum(1 for p in passed.values() if p) > 1000  # the preference did act
    assert lineup.preferred > 1000


# -- WarmUp ------------------------------------------------------------------------------------
def test_warm_up_one_leads_the_others_wait_until_released() -> None:
    hot = HotGroups()
    warm: WarmUp[str] = WarmUp(hot)
    verdict, token = warm.enter(A)
    assert verdict is Verdict.LEAD and token is not None
    assert warm.enter(A) == (Verdict.WAIT, None)
    warm.hold(A, "a2")
    warm.hold(A, "a3")
    warm.unhold(A, "a3")  # cancelled while held
    assert warm.enter(B)[0] is Verdict.LEAD  # other groups are not held
    assert warm.enter(None) == (Verdict.GO, None)
    assert warm.held == 1
    assert warm.release(A, object()) == []  # a stale token releases nothing
    assert warm.release(A, token) == ["a2"] and warm.held == 0
    assert warm.release(A, token) == []
    hot.started(A)  # the leader ran: the group is warm now
    assert warm.enter(A) == (Verdict.GO, None)


# -- through the dispatcher --------------------------------------------------------------------
class Gates:
    """A FunctionEngine answer that holds each request (by `body["id"]`) until released; a
    request in `fail` answers 400 when released."""

    def __init__(self) -> None:
        self.events: dict[str, asyncio.Event] = {}
        self.fail: set[str] = set()

    def event(self, key: str) -> asyncio.Event:
        return self.events.setdefault(key, asyncio.Event())

    def release(self, key: str) -> None:
        self.event(key).set()

    async def __call__(self, endpoint: str, body: dict[str, Any]) -> tuple[int, Any]:
        key = body["id"]
        await self.event(key).wait()
        return (400 if key in self.fail else 200), {"id": key}


def make(gates: Gates, *, limit: int, **kw: Any) -> tuple[Dispatcher, FunctionEngine]:
    engine = FunctionEngine(gates)
    policy = RetryPolicy(attempts=1, base_delay=0.01, max_delay=0.05, jitter="none")
    return Dispatcher(engine, max_concurrency=limit, policy=policy, **kw), engine


def sent(engine: FunctionEngine) -> list[str]:
    return [body["id"] for _, body in engine.calls]


def start(
    d: Dispatcher, key: str, group: bytes | None, stopped: Callable[[], bool] | None = None
) -> asyncio.Task[Outcome]:
    return asyncio.create_task(d.run(CHAT, {"id": key}, group=group, stopped=stopped))


async def until(probe: Callable[[], object]) -> None:
    await poll_async(probe, timeout=10, interval=0)


@pytest.mark.parametrize("on", [True, False])
def test_a_freed_slot_goes_to_the_group_that_just_ran(on: bool) -> None:
    async def scenario() -> list[str]:
        gates = Gates()
        d, engine = make(gates, limit=1, hot_groups=on, warmup_seconds=0)
        first = start(d, "a0", A)
        await until(lambda: sent(engine) == ["a0"])
        others = [start(d, "b1", B), start(d, "c1", C)]
        await until(lambda: d.waiting == 2)
        others.append(start(d, "a1", A))
        await until(lambda: d.waiting == 3)
        for key in ("a0", "a1", "b1", "c1"):
            gates.release(key)
        await asyncio.gather(first, *others)
        return sent(engine)

    order = run(scenario())
    assert order == (["a0", "a1", "b1", "c1"] if on else ["a0", "b1", "c1", "a1"])


@pytest.mark.parametrize("on", [True, False])
def test_a_cold_group_sends_one_request_first(on: bool) -> None:
    async def scenario() -> None:
        gates = Gates()
        d, engine = make(gates, limit=8, hot_groups=on, warmup_seconds=60)
        tasks = [start(d, f"a{i}", A) for i in range(3)] + [start(d, "b0", B)]
        if not on:  # every request of the group at once
            await until(lambda: len(engine.calls) == 4)
            for t in ("a0", "a1", "a2", "b0"):
                gates.release(t)
            await asyncio.gather(*tasks)
            return
        await until(lambda: sorted(sent(engine)) == ["a0", "b0"])  # B is not held by A
        assert d.waiting == 2 and d.stats.held == 2
        gates.release("b0")
        await until(lambda: tasks[3].done())
        assert sorted(sent(engine)) == ["a0", "b0"]
        gates.release("a0")  # the leader ends: the others go
        await until(lambda: len(engine.calls) == 4)
        assert d.waiting == 0
        gates.release("a1")
        gates.release("a2")
        assert all(o.ok for o in await asyncio.gather(*tasks))
        # warm now: the next request of A goes at once, without a leader
        again = start(d, "a3", A)
        gates.release("a3")
        assert (await again).ok and d.stats.held == 2

    run(scenario())


def test_a_failed_leader_releases_its_group() -> None:
    async def scenario() -> None:
        gates = Gates()
        gates.fail.add("a0")
        d, engine = make(gates, limit=8, hot_groups=True, warmup_seconds=60)
        tasks = [start(d, f"a{i}", A) for i in range(3)]
        await until(lambda: sent(engine) == ["a0"] and d.waiting == 2)
        gates.release("a0")
        await until(lambda: len(engine.calls) == 3)
        gates.release("a1")
        gates.release("a2")
        outcomes = await asyncio.gather(*tasks)
        assert [o.status for o in outcomes] == [400, 200, 200]

    run(scenario())


def test_a_cancelled_or_stopped_leader_releases_its_group() -> None:
    async def scenario() -> None:
        gates = Gates()
        d, engine = make(gates, limit=1, hot_groups=True, warmup_seconds=60)
        busy = start(d, "c0", C)  # holds the one slot: A's leader waits in the window
        await until(lambda: sent(engine) == ["c0"])
        leader = start(d, "a0", A)
        held = start(d, "a1", A)
        await until(lambda: d.stats.held == 1)
        leader.cancel()  # cancelled in the window, never sent
        await until(lambda: leader.done() and d.waiting == 1)  # a1 is in the window now
        stop = False
        second = start(d, "b0", B, stopped=lambda: stop)  # B's leader, to be stopped
        held_b = start(d, "b1", B)
        await until(lambda: d.stats.held == 2 and d.waiting == 3)
        stop = True
        gates.release("c0")
        gates.release("a1")
        gates.release("b1")
        await asyncio.gather(busy, held, second, held_b)
        assert (await second).sent is False
        assert sent(engine) == ["c0", "a1", "b1"]

    run(scenario())


def test_the_group_goes_after_the_bound_even_if_the_leader_runs_on() -> None:
    async def scenario() -> None:
        gates = Gates()
        d, engine = make(gates, limit=8, hot_groups=True, warmup_seconds=0.05)
        tasks = [start(d, f"a{i}", A) for i in range(3)]
        await until(lambda: len(engine.calls) == 3)  # a0 still at the engine
        assert not tasks[0].done()
        for t in ("a0", "a1", "a2"):
            gates.release(t)
        await asyncio.gather(*tasks)

    run(scenario())


def test_requests_without_a_group_are_never_held() -> None:
    async def scenario() -> None:
        gates = Gates()
        d, engine = make(gates, limit=8, hot_groups=True, warmup_seconds=60)
        tasks = [start(d, f"n{i}", None) for i in range(2)]
        tasks += [start(d, f"z{i}", NO_GROUP) for i in range(2)]
        await until(lambda: len(engine.calls) == 4)
        for t in ("n0", "n1", "z0", "z1"):
            gates.release(t)
        await asyncio.gather(*tasks)
        assert d.stats.held == 0

    run(scenario())
