"""`Window`: a concurrency limit that can be moved while requests are in flight.

`asyncio.Semaphore` cannot shrink, and the adaptive governor will move the limit every few
seconds, so this is a small semaphore of our own:
- `limit` is a target, not an invariant: shrinking below the current `in_flight` takes no slot
  away from a running request; the window simply admits nobody until enough have finished.
- Growing wakes as many waiters as the new room allows, first come first served.
- A slot is handed straight from `release()` to the oldest waiter, so a newcomer arriving between
  the release and the waiter's wake-up cannot overtake it.
- Cancellation is safe: a waiter cancelled after it was handed a slot passes the slot on.
- Who is "the oldest waiter" is the lineup's to say (`hot_groups.Lineup`): first come first
  served by default; given a `HotGroups`, a freed slot goes to the oldest waiter whose prefix
  group is at the engine now or just finished (`acquire(group)`), within an aging bound (a
  waiter passed over `MAX_PASSES` times or waiting `MAX_WAIT` seconds goes next). The window
  itself only asks; the choice is pure and tested on its own.

The fast path (room available, nobody waiting) is two integer operations, no future.
"""

from __future__ import annotations

import asyncio

from backfill.dispatch.hot_groups import HotGroups, Lineup


class Window:
    def __init__(self, limit: int, hot: HotGroups | None = None) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self._limit = limit
        self._in_flight = 0
        self._waiters: Lineup[asyncio.Future[None]] = Lineup(hot)

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    def set_limit(self, limit: int) -> None:
        """Move the limit; takes effect at once for waiters, never interrupts running work."""
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self._limit = limit
        self._wake()

    async def acquire(self, group: bytes | None = None) -> None:
        """Wait for a slot; `group` is the request's prefix group (None: none)."""
        if self._in_flight < self._limit and not self._waiters:
            self._in_flight += 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(future, group)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                # We were handed a slot but cancelled before using it: give it back.
                self.release()
            else:
                self._waiters.discard(future)
            raise

    def release(self) -> None:
        self._in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        waiters = self._waiters
        while waiters and self._in_flight < self._limit:
            future = waiters.pop()
            if not future.done():
                self._in_flight += 1  # the slot now belongs to that waiter
                future.set_result(None)
