"""Hot prefix groups: who goes next through a model's window, and which groups warm up first.
Pure: no asyncio, the clock injected. `window.py` asks `Lineup` who gets a freed slot;
`warmup.py` is the asyncio around `WarmUp`.

Why: every shard of every batch of a model walks the prefix groups in the same order
(`domain/planning.py`), but shards that run at once drift apart, and a shard that is a few
groups ahead sends prompts the engine's prefix cache no longer (or not yet) holds. The window
is where they meet, so the window leans them together:

- A group is *hot* (`HotGroups`) while requests of it are at the engine, and for a short while
  after: the last `HOT_RECENT` groups to finish a request. Bounded: the running groups are at
  most the window's limit, the recent ones a handful.
- `Lineup`: the requests waiting for a slot, in arrival order. A freed slot goes to the oldest
  waiter whose group is hot, so a lagging shard's requests of the group the leader is on (or
  just left) go before the leader's first requests of a new group: the leader waits a little
  and the two meet on the same prefix. Looking only `LOOKAHEAD` waiters deep keeps a pick cheap.
- Aging, so nobody starves: each waiter counts how often a younger one went before it
  (`passed`). One passed over `MAX_PASSES` times, or waiting `MAX_WAIT` seconds, goes next
  (the oldest such first) whatever the groups. Passing over a waiter also passes every older
  one, so the oldest waiter is always the most passed-over and the longest waiting: the scan
  stops at the first aged waiter, which is then the head.
- Without any hot group (no group running, nothing finished lately; or no groups at all,
  planning off) the lineup is first come first served, exactly the window of before.

Warm-up (`WarmUp`): a prefix cache holds a prompt's blocks only once they were computed, so a
*cold* group's requests that reach the engine together all compute the shared prefix, each
its own copy. A request of a group that is neither hot nor among the last `WARM_RECENT` groups
seen therefore *leads*: it goes alone, and the group's other requests that arrive meanwhile are
held (outside the window: other groups' requests take the slots) until the leader is
released, by its end (answered, failed, stopped, cancelled: whatever way it ends) or by the
warm-up bound after it reached the engine, whichever comes first (`warmup.py`). Batch requests
are not streamed, so the first token, the moment the prefix is cached, is not seen: the end is
what is known, and the bound keeps a long generation from holding its group for minutes.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar

#: groups whose last request just finished that still count as hot
HOT_RECENT = 8
#: groups seen lately (started a request) that do not need a warm-up again
WARM_RECENT = 64
#: a waiter passed over this many times goes next
MAX_PASSES = 32
#: a waiter waiting this many seconds goes next
MAX_WAIT = 5.0
#: waiters looked at for a hot group, oldest first (beyond: first come first served)
LOOKAHEAD = 256
#: a group of no prompt (`planning.group_of` of a request without text): not a group at all
NO_GROUP = bytes(32)

T = TypeVar("T", bound=Hashable)


def real_group(group: bytes | None) -> bytes | None:
    """The group, or None when the key carries none (no prompt text, planning off)."""
    return None if group is None or group == NO_GROUP else group


class HotGroups:
    """Which prefix groups of a model have requests at the engine now or just finished."""

    def __init__(self, *, hot_recent: int = HOT_RECENT, warm_recent: int = WARM_RECENT) -> None:
        self.running: Counter[bytes] = Counter()
        self._hot: OrderedDict[bytes, None] = OrderedDict()  # just finished, newest last
        self._warm: OrderedDict[bytes, None] = OrderedDict()  # started lately, newest last
        self._hot_recent = hot_recent
        self._warm_recent = warm_recent

    def __bool__(self) -> bool:
        return bool(self.running) or bool(self._hot)

    def started(self, group: bytes | None) -> None:
        """A request of `group` took a slot (it is going to the engine)."""
        if group is None:
            return
        self.running[group] += 1
        _touch(self._warm, group, self._warm_recent)

    def ended(self, group: bytes | None) -> None:
        """A request of `group` left its slot (answered, failed, shed or stopped)."""
        if group is None:
            return
        left = self.running[group] - 1
        if left > 0:
            self.running[group] = left
            return
        del self.running[group]
        _touch(self._hot, group, self._hot_recent)

    def is_hot(self, group: bytes | None) -> bool:
        return group is not None and (group in self.running or group in self._hot)

    def is_warm(self, group: bytes | None) -> bool:
        """Hot, or started lately (its prefix is probably still in the engine's cache)."""
        return group is not None and (self.is_hot(group) or group in self._warm)


def _touch(recent: OrderedDict[bytes, None], group: bytes, size: int) -> None:
    recent[group] = None
    recent.move_to_end(group)
    while len(recent) > size:
        recent.popitem(last=False)


@dataclass(slots=True)
class _Waiting:
    group: bytes | None
    since: float
    passed: int = 0


class Lineup(Generic[T]):
    """Waiters for a slot, in arrival order; `pop` names who goes next (see the module doc).
    With `hot=None`: first come first served."""

    def __init__(
        self,
        hot: HotGroups | None = None,
        *,
        max_passes: int = MAX_PASSES,
        max_wait: float = MAX_WAIT,
        lookahead: int = LOOKAHEAD,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.hot = hot
        self.max_passes = max_passes
        self.max_wait = max_wait
        self.lookahead = lookahead
        self._clock = clock
        self._items: OrderedDict[T, _Waiting] = OrderedDict()
        #: picks that went to a younger waiter than the oldest (a hot group's)
        self.preferred = 0

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(self._items)

    def add(self, item: T, group: bytes | None = None) -> None:
        self._items[item] = _Waiting(group, self._clock())

    def discard(self, item: T) -> None:
        self._items.pop(item, None)

    def passed(self, item: T) -> int:
        """How often a younger waiter went before `item` (for tests and figures)."""
        return self._items[item].passed

    def pop(self) -> T:
        """Remove and return who goes next: the oldest waiter if it is aged, else the oldest
        of a hot group within `lookahead`, else the oldest. IndexError when empty."""
        items = self._items
        if not items:
            raise IndexError("pop from an empty lineup")
        hot = self.hot
        if hot is None or not hot or len(items) == 1:
            return items.popitem(last=False)[0]
        now = self._clock()
        skipped: list[_Waiting] = []
        chosen: T | None = None
        for n, (item, waiting) in enumerate(items.items()):
            if n >= self.lookahead:
                break
            if waiting.passed >= self.max_passes or now - waiting.since >= self.max_wait:
                chosen = item  # aged: nobody younger may pass it again
                break
            if hot.is_hot(waiting.group):
                chosen = item
                break
            skipped.append(waiting)
        if chosen is None or not skipped:
            return items.popitem(last=False)[0]
        for waiting in skipped:
            waiting.passed += 1
        self.preferred += 1
        del items[chosen]
        return chosen


class Verdict(Enum):
    GO = "go"  # the group is warm: straight on to the window
    LEAD = "lead"  # a cold group: this request goes first, alone
    WAIT = "wait"  # the group's leader has not been released yet


class WarmUp(Generic[T]):
    """Per cold group, the leader and the requests held behind it. Memory: one entry per group
    with a leader in progress (a leader is a running request, so at most the requests in
    hand) and the held items (requests already started by a shard)."""

    def __init__(self, hot: HotGroups) -> None:
        self.hot = hot
        #: group -> (the leader's token, items held behind it)
        self._leading: dict[bytes, tuple[object, list[T]]] = {}
        self.held = 0

    def enter(self, group: bytes | None) -> tuple[Verdict, object | None]:
        """What a request of `group` does now; a leader also gets its token (for `release`)."""
        if group is None:
            return Verdict.GO, None
        if group in self._leading:
            return Verdict.WAIT, None
        if self.hot.is_warm(group):
            return Verdict.GO, None
        token = object()
        self._leading[group] = (token, [])
        return Verdict.LEAD, token

    def hold(self, group: bytes, item: T) -> None:
        """Keep `item` until the group's leader is released (after `enter` said WAIT)."""
        self._leading[group][1].append(item)
        self.held += 1

    def unhold(self, group: bytes, item: T) -> None:
        """`item` gave up waiting (cancelled)."""
        entry = self._leading.get(group)
        if entry is not None and item in entry[1]:
            entry[1].remove(item)
            self.held -= 1

    def is_leading(self, group: bytes, token: object) -> bool:
        entry = self._leading.get(group)
        return entry is not None and entry[0] is token

    def release(self, group: bytes, token: object) -> list[T]:
        """The leader `token` is done (ended, or the bound passed): the items held behind it,
        to be let go. A stale token (the group was already released) releases nothing."""
        if not self.is_leading(group, token):
            return []
        _, items = self._leading.pop(group)
        self.held -= len(items)
        return items
