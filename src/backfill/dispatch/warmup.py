"""`WarmUpGate`: a cold prefix group sends one request first (the decisions are `WarmUp`'s in
`hot_groups.py`; this is the asyncio around it).

The gate sits *before* the window: requests held here take no slot, so other groups go on
while a group warms up. A held request waits on a future; the leader's `release` (called by
the dispatcher whichever way the leader's `run` ends: answer, failure, stop, cancellation,
an exception) or its timer (`seconds` after the leader first reached the engine) sets them
all. So nothing waits on a leader that can no longer release it: no deadlock, and a failed or
stopped leader lets its group go (then all at once, as without the gate).

The bound: batch requests are not streamed, so the leader's first token (its prefix now in the
engine's cache) is not observed; its end is. A leader with a long generation would hold its
group for as long as it decodes, so the group goes at the latest `seconds` after the leader was
handed to the engine (2 s by default: a 2k-token prefill takes well under a second on a GPU;
on a slow CPU engine the end usually comes first anyway, a short request is short there too).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from backfill.dispatch.hot_groups import HotGroups, Verdict, WarmUp

#: seconds after the leader reached the engine at which its group goes anyway
WARMUP_SECONDS = 2.0


class Lead:
    """A leader's handle: its group and token, and the timer armed when it reaches the engine."""

    __slots__ = ("group", "timer", "token")

    def __init__(self, group: bytes, token: object) -> None:
        self.group = group
        self.token = token
        self.timer: asyncio.TimerHandle | None = None


class WarmUpGate:
    def __init__(
        self,
        hot: HotGroups,
        seconds: float = WARMUP_SECONDS,
        on_hold: Callable[[], None] = lambda: None,
    ) -> None:
        self.state: WarmUp[asyncio.Future[None]] = WarmUp(hot)
        self.seconds = seconds
        self._on_hold = on_hold  # called as each request starts waiting for a leader

    @property
    def held(self) -> int:
        """Requests waiting for their group's leader now."""
        return self.state.held

    async def enter(self, group: bytes | None) -> Lead | None:
        """Wait while the group's leader is out; a `Lead` when this request leads (pass it to
        `arm` when it reaches the engine and to `release` when it ends, in a `finally`)."""
        if self.seconds <= 0:
            return None
        verdict, token = self.state.enter(group)
        if verdict is Verdict.GO or group is None:
            return None
        if verdict is Verdict.LEAD:
            return Lead(group, token)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.state.hold(group, future)
        self._on_hold()
        try:
            await future
        except asyncio.CancelledError:
            self.state.unhold(group, future)
            raise
        return None

    def arm(self, lead: Lead) -> None:
        """The leader is handed to the engine: its group goes `seconds` from now at the latest
        (the first attempt arms it; retries do not re-arm)."""
        if lead.timer is None and self.state.is_leading(lead.group, lead.token):
            lead.timer = asyncio.get_running_loop().call_later(self.seconds, self.release, lead)

    def release(self, lead: Lead) -> None:
        """Let the requests held behind `lead` go (idempotent)."""
        if lead.timer is not None:
            lead.timer.cancel()
        for future in self.state.release(lead.group, lead.token):
            if not future.done():
                future.set_result(None)
