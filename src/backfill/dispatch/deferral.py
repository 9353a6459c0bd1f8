"""`Deferral`: long prompts wait, outside the window, while shorter ones go first.

Why: one long prompt is a compute-bound prefill of its own, and every real-time token in that
engine step waits for it; short prompts fill the steps' spare compute instead. The governor
turns it on (a threshold in estimated prompt tokens) while real-time traffic is active.

A parked request holds no window slot. It goes when deferral is turned off or its threshold
no longer covers it, when its own deadline passes (`until`: the worker passes the middle of
its batch's completion window), or when the window has room that no other request waits for,
so it never starves: it only lets the short ones go first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from backfill.dispatch.window import Window


class Deferral:
    def __init__(
        self, window: Window, wall: Callable[[], float], counted: Callable[[int], None]
    ) -> None:
        #: prompts with more estimated tokens than this wait (None: nobody waits)
        self.over: float | None = None
        #: True once a threshold was applied: long prompts may wait from then on
        self.may_defer = False
        self._window = window
        self._wall = wall  # epoch seconds, for `until`
        self._counted = counted  # told how many are parked after every change
        #: parked requests, oldest first: (prompt tokens, until when at most, future); a
        #: future's result is True when it was let go for the window's room, which it then
        #: holds until it reaches the window (`_leaving`)
        self._parked: list[tuple[int, float, asyncio.Future[bool]]] = []
        self._leaving = 0

    def set_over(self, over: float | None) -> None:
        """Move the threshold (None: no deferral; everyone parked goes)."""
        self.over = over
        self.may_defer = self.may_defer or over is not None
        self.unpark()

    async def wait(self, tokens: int, until: float) -> None:
        """Wait while a prompt of `tokens` counts as long, at most until `until` (epoch s);
        returns at once for a short prompt."""
        over = self.over
        if over is None or tokens <= over or self._wall() >= until:
            return
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._parked.append((tokens, until, future))
        self.unpark()
        try:
            await future
        finally:
            if not future.done():
                future.cancel()
            if future.cancelled():
                self.unpark()  # drops it (and recounts)
            elif future.result():
                self._leaving -= 1  # at the window now (or cancelled on the way)

    def unpark(self) -> None:
        """Let parked requests go: all that are no longer long (or all, deferral off) or whose
        time is up, then the oldest one whenever the window has room nobody else waits for."""
        parked = self._parked
        if not parked:
            return
        over = self.over
        now = self._wall()
        keep: list[tuple[int, float, asyncio.Future[bool]]] = []
        for entry in parked:
            tokens, until, future = entry
            if future.done():
                continue
            if over is None or tokens <= over or now >= until:
                future.set_result(False)
            else:
                keep.append(entry)
        window = self._window
        while keep and window.in_flight + self._leaving < window.limit and not window.waiting:
            keep.pop(0)[2].set_result(True)
            self._leaving += 1
        parked[:] = keep
        self._counted(len(keep))

    @property
    def parked(self) -> bool:
        return bool(self._parked)
