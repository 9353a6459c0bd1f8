"""The tests' one wait: `poll` and `poll_async` (`tests/support/polling.py`)."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from polling import poll, poll_async


def test_poll_returns_the_first_value_that_is_done() -> None:
    counter = itertools.count()
    assert poll(lambda: next(counter), lambda n: n >= 3, interval=0) == 3
    assert poll(iter([0, "", "ready"]).__next__, interval=0) == "ready"  # truthy without `done`


def test_a_timeout_names_what_was_awaited_and_the_last_value() -> None:
    with pytest.raises(AssertionError, match=r"waiting for the answer; last: 7"):
        poll(lambda: 7, lambda n: n > 7, what="the answer", timeout=0.05, interval=0.01)
    # without `what`, the lambda's own source says what hung
    with pytest.raises(AssertionError, match=r"0\.05s waiting for lambda: 1 \+ 1 == 3") as info:
        poll(lambda: 1 + 1 == 3, timeout=0.05, interval=0.01)
    assert "last:" not in str(info.value)  # a predicate's False says nothing more


def test_poll_async_awaits_awaitable_probes_and_lets_the_loop_run() -> None:
    async def main() -> None:
        done = asyncio.Event()
        asyncio.get_running_loop().call_soon(done.set)
        assert await poll_async(lambda: done.is_set(), interval=0)

        async def ready() -> str:
            return "yes" if done.is_set() else ""

        assert await poll_async(ready, lambda v: v == "yes") == "yes"
        with pytest.raises(AssertionError, match="waiting for never"):
            await poll_async(lambda: False, what="never", timeout=0.02, interval=0)

    asyncio.run(main())
