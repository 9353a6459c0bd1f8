"""Identical requests run once (`domain/duplicates.py`, `dispatch/dedup.py`): which bodies may
share, one call for copies in flight together, the recent-answers cache for late copies, a
shared failure, engine time counted once, and a leader that stops leaving no one behind."""

from __future__ import annotations

import asyncio
from typing import Any

from backfill.dispatch import Dispatcher, Outcome
from backfill.dispatch.dedup import RecentAnswers
from backfill.domain.duplicates import body_key, deterministic, may_share
from backfill.domain.retry import RetryPolicy
from backfill.testing.engine import FunctionEngine

CHAT = "/v1/chat/completions"


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], **extra}


def test_which_bodies_may_share() -> None:
    assert deterministic(CHAT, chat("a", temperature=0))
    assert deterministic(CHAT, chat("a", temperature=0.0))
    assert deterministic(CHAT, chat("a", temperature=1, seed=7))
    assert not deterministic(CHAT, chat("a"))  # OpenAI samples at temperature 1 by default
    assert not deterministic(CHAT, chat("a", temperature=0.5, seed=None))
    assert not deterministic(CHAT, chat("a", temperature=False))
    assert deterministic("/v1/embeddings", {"input": "x"})
    assert may_share("all", CHAT, chat("a")) and not may_share("off", CHAT, chat("a", seed=1))
    assert body_key(CHAT, chat("a")) == body_key(CHAT, chat("a"))
    assert body_key(CHAT, chat("a")) != body_key(CHAT, chat("a", temperature=0))
    assert body_key(CHAT, chat("a")) != body_key("/v1/completions", chat("a"))


def dispatcher(answer: Any, dedup: str = "deterministic") -> tuple[Dispatcher, FunctionEngine]:
    engine = FunctionEngine(answer, model="m")
    policy = RetryPolicy(attempts=2, base_delay=0.0, max_delay=0.0)

    async def no_sleep(_: float) -> None:
        return None

    d = Dispatcher(engine, max_concurrency=8, policy=policy, sleep=no_sleep, dedup=dedup)
    return d, engine


def test_copies_in_flight_share_one_call_and_engine_time_once() -> None:
    async def main() -> None:
        gate = asyncio.Event()

        async def answer(endpoint: str, body: dict[str, Any]) -> tuple[int, Any]:
            await gate.wait()
            await asyncio.sleep(0.01)
            usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
            return 200, {"text": body["messages"][0]["content"], "usage": usage}

        d, engine = dispatcher(answer)
        same = chat("hello", temperature=0)
        tasks = [asyncio.create_task(d.run(CHAT, same)) for _ in range(5)]
        other = asyncio.create_task(d.run(CHAT, chat("other", temperature=0)))
        await asyncio.sleep(0)
        gate.set()
        outcomes = await asyncio.gather(*tasks)
        await other
        assert len(engine.calls) == 2  # five copies, one call; plus the other body
        assert all(o.ok and o.parsed["text"] == "hello" for o in outcomes)
        assert all(o.parsed["usage"]["total_tokens"] == 5 for o in outcomes)  # per line
        timed = [o.engine_seconds for o in outcomes if o.engine_seconds > 0]
        assert len(timed) == 1  # engine time counted once
        assert (d.stats.requests, d.stats.shared, d.stats.sent) == (6, 4, 2)

        # a late copy: answered from the recent answers, no call
        late = await d.run(CHAT, same)
        assert late.ok and late.engine_seconds == 0 and len(engine.calls) == 2
        assert d.stats.shared == 5

    asyncio.run(main())


def test_sampled_bodies_are_sent_each_time_unless_the_model_opts_in() -> None:
    async def main() -> None:
        d, engine = dispatcher(lambda e, b: (200, {"ok": True}))
        await asyncio.gather(*(d.run(CHAT, chat("s")) for _ in range(3)))
        assert len(engine.calls) == 3
        d, engine = dispatcher(lambda e, b: (200, {"ok": True}), dedup="all")
        await asyncio.gather(*(d.run(CHAT, chat("s")) for _ in range(3)))
        assert len(engine.calls) == 1
        d, engine = dispatcher(lambda e, b: (200, {"ok": True}), dedup="off")
        await asyncio.gather(*(d.run(CHAT, chat("s", seed=1)) for _ in range(3)))
        assert len(engine.calls) == 3

    asyncio.run(main())


def test_a_failed_shared_call_fails_each_copy_and_is_not_cached() -> None:
    async def main() -> None:
        async def answer(endpoint: str, body: dict[str, Any]) -> tuple[int, Any]:
            await asyncio.sleep(0.01)
            return 400, {"error": {"message": "bad", "code": "invalid"}}

        d, engine = dispatcher(answer)
        body = chat("x", temperature=0)
        outcomes = await asyncio.gather(*(d.run(CHAT, body) for _ in range(4)))
        assert [o.status for o in outcomes] == [400] * 4
        assert len(engine.calls) == 1
        await d.run(CHAT, body)  # failures are not kept: a later copy tries again
        assert len(engine.calls) == 2

    asyncio.run(main())


def test_a_leader_stopped_before_the_engine_leaves_followers_to_run_it() -> None:
    async def main() -> None:
        blocker_gate = asyncio.Event()

        async def slow(endpoint: str, body: dict[str, Any]) -> tuple[int, Any]:
            if body.get("hold"):
                await blocker_gate.wait()
            return 200, {"ok": True}

        d, engine = dispatcher(slow)
        d.set_limit(1)
        blocker = asyncio.create_task(d.run(CHAT, chat("hold", hold=True)))
        await asyncio.sleep(0)
        stop = {"leader": False}
        body = chat("y", temperature=0)
        leader = asyncio.create_task(d.run(CHAT, body, stopped=lambda: stop["leader"]))
        await asyncio.sleep(0)
        follower = asyncio.create_task(d.run(CHAT, body))
        await asyncio.sleep(0)
        stop["leader"] = True  # the leader's batch is cancelled while it waits for a slot
        blocker_gate.set()
        first, second = await leader, await follower
        await blocker
        assert not first.sent  # the leader has no outcome: its line runs again later
        assert second.sent and second.ok  # the follower ran it itself
        assert sum(1 for _, b in engine.calls if b.get("messages") == body["messages"]) == 1

    asyncio.run(main())


def test_recent_answers_are_bounded_in_bytes() -> None:
    cache = RecentAnswers(max_bytes=400)
    for n in range(10):
        cache.put(bytes([n]) * 16, Outcome(200, b"x" * 60))
    assert cache.bytes <= 400 and len(cache) == 5
    assert cache.get(bytes([0]) * 16) is None and cache.get(bytes([9]) * 16) is not None
    cache.put(b"k" * 16, Outcome(200, b"x" * 200))  # over a quarter: not kept
    assert cache.get(b"k" * 16) is None


def test_identical_requests_of_two_projects_never_share() -> None:
    async def main() -> None:
        async def answer(endpoint: str, body: dict[str, Any]) -> tuple[int, Any]:
            await asyncio.sleep(0.01)
            return 200, {"text": "x", "usage": {"prompt_tokens": 1, "completion_tokens": 1}}

        d, engine = dispatcher(answer)
        same = chat("hello", temperature=0)
        a = [asyncio.create_task(d.run(CHAT, same, scope="proj_a")) for _ in range(3)]
        b = [asyncio.create_task(d.run(CHAT, same, scope="proj_b")) for _ in range(3)]
        outcomes = await asyncio.gather(*a, *b)
        assert all(o.ok for o in outcomes)
        assert len(engine.calls) == 2  # one per project, never one for both
        await d.run(CHAT, same, scope="proj_c")  # a third project: not from the cache either
        assert len(engine.calls) == 3
        assert [o.engine_seconds > 0 for o in outcomes].count(True) == 2  # each project's own

    asyncio.run(main())


def test_the_recent_answers_keep_bytes_not_decoded_bodies() -> None:
    cache = RecentAnswers(1000)
    cache.put(b"k", Outcome(status=200, body=b'{"a": 1}', parsed={"a": 1}))
    kept = cache.get(b"k")
    assert kept is not None and kept.parsed is None and kept.body == b'{"a": 1}'
