"""Identical requests run once: one call in flight per body, and a small cache of the answers
just given.

`Dedup.run(key, call)` either makes the call (the *leader*) or waits for the leader's outcome
(a *follower*) and returns it as its own. Followers' outcomes carry no engine time, so the
ledger's `engine_ms` counts the call once, while each line still reports the answer's full
`usage` (what OpenAI would have charged for that line). A failed call fails every line that
shared it with the same error; each still gets its own outcome.

A leader that ends without an outcome (stopped before the engine, cancelled, or raising) wakes
its followers with none: each then runs the request itself (one of them leads again), so a
cancelled batch never leaves another batch's identical line without an answer.

In planned order (`domain/planning.py`) identical bodies sort next to each other, so the second
copy often arrives just after the first finished: `RecentAnswers` keeps 2xx outcomes by key,
least recently used first out, bounded in bytes (failures are not kept: a later copy tries
again).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backfill.dispatch.dispatcher import Outcome

#: bytes of answer bodies kept for late duplicates
CACHE_BYTES = 8 * 1024 * 1024


class RecentAnswers:
    """An LRU of 2xx outcomes by request key, at most `max_bytes` of bodies."""

    def __init__(self, max_bytes: int = CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[bytes, Outcome] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: bytes) -> Outcome | None:
        outcome = self._items.get(key)
        if outcome is not None:
            self._items.move_to_end(key)
        return outcome

    def put(self, key: bytes, outcome: Outcome) -> None:
        size = len(outcome.body) + len(key)
        if size > self.max_bytes // 4:  # one big answer must not flush the rest
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= len(old.body) + len(key)
        # the body's bytes only: a copy re-parses it (`outcomes.outcome_line`), so the cache's
        # memory is what it counts, not several times that in decoded dicts
        self._items[key] = replace(outcome, parsed=None)
        self.bytes += size
        while self.bytes > self.max_bytes:
            k, o = self._items.popitem(last=False)
            self.bytes -= len(o.body) + len(k)


class Dedup:
    def __init__(self, cache_bytes: int = CACHE_BYTES) -> None:
        self._flying: dict[bytes, asyncio.Future[Outcome | None]] = {}
        self.recent = RecentAnswers(cache_bytes)

    async def run(self, key: bytes, call: Callable[[], Awaitable[Outcome]]) -> tuple[Outcome, bool]:
        """The request's outcome, and whether another request's call gave it."""
        while True:
            cached = self.recent.get(key)
            if cached is not None:
                return replace(cached, engine_seconds=0.0), True
            leader = self._flying.get(key)
            if leader is None:
                return await self._lead(key, call), False
            # shield: our own cancellation must not cancel the leader's future
            outcome = await asyncio.shield(leader)
            if outcome is not None:
                return replace(outcome, engine_seconds=0.0), True
            # the leader ended without an outcome: run it ourselves (or follow a new leader)

    async def _lead(self, key: bytes, call: Callable[[], Awaitable[Outcome]]) -> Outcome:
        future: asyncio.Future[Outcome | None] = asyncio.get_running_loop().create_future()
        self._flying[key] = future
        outcome: Outcome | None = None
        try:
            outcome = await call()
            return outcome
        finally:
            del self._flying[key]
            shared = outcome if outcome is not None and outcome.sent else None
            future.set_result(shared)  # first: followers never wait on the cache below
            if shared is not None and shared.ok:
                self.recent.put(key, shared)
