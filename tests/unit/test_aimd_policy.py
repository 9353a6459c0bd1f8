"""The AIMD admission baseline (`dispatch/aimd.py`) with synthetic signals: directions only."""

from __future__ import annotations

from backfill.dispatch.aimd import AimdConfig, AimdPolicy
from backfill.dispatch.policy import Decision
from backfill.dispatch.signals import Signals

TTFT, TPOT = 0.100, 0.020  # the targets (s)


def aimd(**kw: object) -> AimdPolicy:
    return AimdPolicy(AimdConfig(ceiling=256, ttft_target=TTFT, tpot_target=TPOT, **kw))  # type: ignore[arg-type]


class World:
    """Ticks of 0.1 s; the worker keeps the batch at the limit."""

    def __init__(self, policy: AimdPolicy) -> None:
        self.policy = policy
        self.now = 0.0
        self.batch = policy.limit

    def tick(
        self, ttft: float = 0.05, tpot: float = 0.01, throttled: int = 0, samples: int = 3
    ) -> Decision:
        self.now += 0.1
        d = self.policy.decide(
            Signals(
                now=self.now,
                rt_in_flight=samples,
                rt_arrivals=samples,
                batch_in_flight=self.batch,
                batch_throttled=throttled,
                rt_ttft=(ttft,) * samples,
                rt_tpot=(tpot,) * samples,
            )
        )
        self.batch = d.limit
        return d


def test_it_adds_one_per_tick_while_inside_the_budget() -> None:
    world = World(aimd(start=10))
    limits = [world.tick().limit for _ in range(20)]
    assert limits == list(range(11, 31))


def test_a_ttft_breach_halves_the_limit_then_holds_for_the_cooldown() -> None:
    world = World(aimd(start=40))
    assert world.tick().limit == 41
    assert world.tick(ttft=TTFT * 1.5).limit == 20
    # the cooldown: no change for 2 s, even on more breaches
    held = [world.tick(ttft=TTFT * 1.5).limit for _ in range(19)]
    assert set(held) == {20}
    assert world.tick(ttft=TTFT * 1.5).limit == 10  # still breached after it: halved again
    after = [world.tick().limit for _ in range(25)]
    assert after[-1] > 10  # inside again: growing


def test_a_tpot_breach_and_a_429_decrease_too() -> None:
    world = World(aimd(start=64))
    assert world.tick(tpot=TPOT * 1.2).limit == 32
    world = World(aimd(start=64))
    assert world.tick(throttled=1).limit == 32


def test_one_slow_request_in_a_hundred_is_inside_the_p99() -> None:
    world = World(aimd(start=10))
    world.tick(samples=99)
    assert world.tick(ttft=TTFT * 3, samples=1).limit == 12  # 1 of 100: the p99 is fine
    assert world.tick(ttft=TTFT * 3, samples=1).limit == 6  # 2 of 101: breached


def test_it_never_leaves_floor_and_ceiling_nor_grows_an_unused_limit() -> None:
    world = World(aimd(start=2, floor=2))
    for _ in range(5):
        world.tick(ttft=1.0)
        world.now += 2.0  # past each cooldown
    assert world.policy.limit == 2
    world = World(aimd(start=250))
    assert [world.tick().limit for _ in range(10)][-1] == 256
    p = aimd(start=10)
    d = p.decide(Signals(now=0.1, rt_in_flight=0, rt_arrivals=0, batch_in_flight=2))
    assert d.limit == 10  # 2 in flight of 10: no more room needed
