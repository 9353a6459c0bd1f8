"""`PacingGate`: where a request holding a window slot waits until prefill pacing lets it go.

The decisions are `Admission`'s (pure); this is the asyncio around it: a queue of waiters, a
pump that lets them through while the token bucket allows, and one timer for when it refills.
The gate sits *after* the window on purpose: requests never pile up between the two and then
go in one lump when the limit rises. With pacing off and nobody queued, a request passes
without a future.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from backfill.dispatch.admission import Admission
from backfill.dispatch.window import Window


class PacingGate:
    def __init__(self, window: Window, clock: Callable[[], float]) -> None:
        self.admission = Admission(window.limit)
        self._window = window
        self._clock = clock
        self._waiting: list[tuple[int, asyncio.Future[None]]] = []
        self._timer: asyncio.TimerHandle | None = None

    def configure(self, pace: float | None, burst: float) -> None:
        """Pace at `pace` (see `Admission`); None turns pacing off and lets everyone go."""
        self.admission.configure(self._window.limit, pace, burst)
        self._pump()

    def answered(self, tokens: int, latency: float) -> None:
        self.admission.answered(tokens, latency)

    async def wait(self, tokens: int) -> None:
        """Wait (holding a window slot) until the pacing lets this request go."""
        if self.admission.rate is None and not self._waiting:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((tokens, future))
        self._pump()
        try:
            await future
        finally:
            if not future.done():
                future.cancel()

    def _pump(self) -> None:
        """Let waiters through while the bucket allows; else set a timer for its refill."""
        waiting = self._waiting
        admission = self.admission
        admission.limit = self._window.limit
        while waiting:
            waiting[:] = [(t, f) for t, f in waiting if not f.done()]
            if not waiting:
                break
            tokens = [t for t, _ in waiting]
            index = admission.pick(tokens, 0, self._clock())
            if index is None:
                wait = admission.wait_time(tokens)
                if self._timer is None and wait is not None:
                    loop = asyncio.get_running_loop()
                    self._timer = loop.call_later(max(wait, 0.002), self._pumped)
                break
            need, future = waiting.pop(index)
            admission.sent(need)
            future.set_result(None)

    def _pumped(self) -> None:
        self._timer = None
        self._pump()
