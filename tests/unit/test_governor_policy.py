"""The governor's policy with synthetic signals and a fake clock: directions, not timings."""

from __future__ import annotations

import random
from collections.abc import Iterator

from backfill.dispatch.policy import Decision, GovernorPolicy, KneeFit, PolicyConfig
from backfill.dispatch.signals import EngineLoad, RealtimeStats, Signals

A = 0.008  # step time with no sequence (s)
K = 130.0  # sequences at which the step time doubles


def step_time(n: float) -> float:
    return A * (1 + n / K)


class World:
    """A fake engine: step time from the sequences it runs; batch in flight follows the limit."""

    def __init__(self, policy: GovernorPolicy, *, metrics: bool = True) -> None:
        self.policy = policy
        self.metrics = metrics
        self.now = 0.0
        self.batch = 0

    def tick(
        self, rt: int, arrivals: int | None = None, throttled: int = 0, unseen: int = 0
    ) -> Decision:
        """`unseen`: real-time requests at the engine that did not pass the gateway."""
        self.now += 0.1
        running = rt + unseen + self.batch
        engine = EngineLoad(running, 0, 0.3, step_time(running)) if self.metrics else None
        tpot = () if self.metrics or rt == 0 else (step_time(running),) * 3
        decision = self.policy.decide(
            Signals(
                now=self.now,
                rt_in_flight=rt,
                rt_arrivals=rt if arrivals is None else arrivals,
                batch_in_flight=self.batch,
                batch_throttled=throttled,
                rt_tpot=tpot,
                engine=engine,
            )
        )
        self.batch = decision.limit  # the worker keeps the window full; shed takes the excess
        return decision

    def run(self, ticks: int, rt: int, **kw: int) -> Iterator[Decision]:  # kw: as for tick
        for _ in range(ticks):
            yield self.tick(rt, **kw)


def policy(**kw: object) -> GovernorPolicy:
    return GovernorPolicy(PolicyConfig(ceiling=1024, window=120.0, idle_after=2.0, **kw))  # type: ignore[arg-type]


def test_backs_off_when_real_time_load_arrives_and_grows_back() -> None:
    world = World(policy())
    # a burst at the start sets the reference peak, then the quiet level
    list(world.run(50, rt=100))
    quiet = list(world.run(200, rt=20))[-1]
    burst = list(world.run(5, rt=100))
    during = burst[-1]
    after = list(world.run(200, rt=20))[-1]
    assert during.limit < quiet.limit
    assert burst[0].limit < quiet.limit  # yields within one tick
    assert after.limit > during.limit


def test_sheds_batch_requests_when_the_limit_falls_far_below_what_runs() -> None:
    world = World(policy())
    list(world.run(50, rt=100))
    list(world.run(200, rt=20))
    before = world.batch
    decision = world.tick(rt=100)
    assert decision.shed > 0
    assert decision.shed == before - decision.limit


def test_no_shedding_when_abort_is_off() -> None:
    world = World(policy(abort=False))
    list(world.run(50, rt=100))
    list(world.run(200, rt=20))
    assert world.tick(rt=100).shed == 0


def test_idle_grows_to_the_ceiling_and_real_time_brings_it_down() -> None:
    world = World(policy())
    decisions = list(world.run(400, rt=0, arrivals=0))
    assert decisions[-1].idle
    assert decisions[-1].limit == 1024
    back = world.tick(rt=5)
    assert not back.idle
    assert back.limit < 200
    assert back.shed > 0


def test_long_prompts_are_deferred_only_while_real_time_is_active() -> None:
    world = World(policy(defer_over=512))
    assert world.tick(rt=5).defer_over == 512
    decisions = list(world.run(400, rt=0, arrivals=0))
    assert decisions[-1].idle and decisions[-1].defer_over is None
    assert world.tick(rt=5).defer_over == 512
    assert World(policy()).tick(rt=5).defer_over is None  # off unless configured


def test_load_the_gateway_does_not_see_arriving_is_a_burst_by_its_size() -> None:
    world = World(policy())
    list(world.run(100, rt=0, arrivals=0, unseen=100))
    valley = list(world.run(200, rt=0, arrivals=0, unseen=20))[-1]
    burst = list(world.run(5, rt=0, arrivals=0, unseen=100))[-1]
    assert burst.limit < valley.limit / 2


def test_grows_gradually() -> None:
    world = World(policy())
    list(world.run(50, rt=100))
    low = world.tick(rt=100).limit
    # the arrival rate of the last `onset` seconds still says "burst" for a few ticks
    limits = [d.limit for d in world.run(30, rt=20)]
    assert limits[-1] > low
    growth = world.policy.config.growth
    for before, after in zip([low, *limits], limits, strict=False):
        assert after <= before + max(1, growth * before) + 1


def test_throttling_halves_the_limit() -> None:
    world = World(policy())
    list(world.run(50, rt=100))
    before = list(world.run(200, rt=20))[-1].limit
    after = world.tick(rt=20, throttled=3).limit
    assert after <= before / 2 + 1


def test_batch_budget_keeps_the_peak_step_time_within_the_inflation() -> None:
    """At the reference peak the batch keeps (f - 1)(r + K) sequences: the modelled step time
    of the peak grows by about the allowed factor, not more."""
    world = World(policy(margin=1.0))
    list(world.run(300, rt=100))
    decision = world.tick(rt=100)
    inflation = step_time(100 + decision.limit) / step_time(100)
    assert 1.0 < inflation <= 1.10 + 0.01


def test_works_without_metrics_from_gateway_latencies() -> None:
    world = World(policy(), metrics=False)
    list(world.run(50, rt=100))
    quiet = list(world.run(200, rt=20))[-1]
    during = list(world.run(5, rt=100))[-1]
    assert during.limit < quiet.limit


def test_knee_fit_learns_the_slope() -> None:
    fit = KneeFit(prior=64.0, forget=0.999)
    for n in range(10, 400, 5):
        fit.add(n, step_time(n))
    params = fit.params()
    assert params is not None
    a, knee = params
    assert abs(a - A) / A < 0.01
    assert abs(knee - K) / K < 0.02


def test_knee_fit_uses_the_prior_without_spread() -> None:
    fit = KneeFit(prior=64.0, forget=0.999)
    for _ in range(50):
        fit.add(100, step_time(100))
    params = fit.params()
    assert params is not None
    assert params[1] == 64.0


def test_realtime_stats_counts_and_drains() -> None:
    clock = iter([1.0, 2.0])
    stats = RealtimeStats(clock=lambda: next(clock))
    stats.started()
    stats.started()
    assert stats.in_flight == 2
    assert stats.arrivals == 2
    stats.ended(0.01)
    stats.ended()
    assert stats.in_flight == 0
    assert stats.drain_tpots() == [0.01]
    assert stats.drain_tpots() == []


def test_a_jump_in_arrivals_drops_the_batch_before_the_load_in_flight_rises() -> None:
    world = World(policy())
    list(world.run(50, rt=100, arrivals=10))
    valley = list(world.run(200, rt=30, arrivals=3))[-1]
    # arrivals x3, the load in flight not yet: seen within half a second (the estimate takes
    # the arrival count's lower bound, so it needs a few ticks of the higher rate)
    burst = list(world.run(5, rt=30, arrivals=10))[-1]
    assert burst.limit < valley.limit / 2
    assert burst.pace is not None  # prefill pacing while real time is active


def test_poisson_noise_at_a_steady_rate_is_not_taken_for_a_burst() -> None:
    # 30 arrivals/s, counted every 100 ms: half a second holds ~15, and its plain rate jumps
    # well above the mean now and then; the lower bound keeps the batch in place
    rng = random.Random(3)

    def poisson(mean: float) -> int:
        count, t = 0, rng.expovariate(mean)
        while t < 1.0:
            count, t = count + 1, t + rng.expovariate(mean)
        return count

    world = World(policy())
    list(world.run(50, rt=100, arrivals=10))  # the reference peak
    list(world.run(100, rt=30, arrivals=3))
    limits = [world.tick(rt=30, arrivals=poisson(3.0)).limit for _ in range(600)]
    assert min(limits) > max(limits) / 2


def test_admission_paces_prompt_tokens_and_lets_short_prompts_pass() -> None:
    from backfill.dispatch.admission import Admission, estimate_prompt_tokens

    adm = Admission(100)
    adm.answered(200, 2.0)  # 100 prompt tokens/s per slot at the limit: 10,000 tokens/s
    assert adm.pick([5000, 100], 0, 0.0) == 0  # no pacing: oldest first
    adm.configure(100, 1.0, 1000.0)
    assert adm.pick([3000, 100, 50], 0, 0.0) == 1  # the long prompt waits, a short one goes
    adm.sent(100)
    adm.sent(850)
    assert adm.pick([3000, 100], 0, 0.0) is None  # the bucket is empty: no lump
    assert adm.pick([3000, 100], 0, 0.05) == 1  # refilled at 10,000 tokens/s
    adm.sent(100)
    assert adm.pick([3000], 0, 1.0) == 0  # a prompt above the burst goes once it is full
    assert adm.pick([1], 100, 1.0) is None  # and never above the limit
    assert estimate_prompt_tokens({"messages": [{"role": "user", "content": "a b c d"}]}) == 4
    assert estimate_prompt_tokens({"prompt": "x" * 400}) == 100
