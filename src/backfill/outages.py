"""Outages of the store or the blob store as background duties see them: told once per
episode, with a count, and waited out with exponential back-off.

A database locked for a minute or a full disk makes every scheduler tick, every duty and every
lease attempt fail the same way; logging each with its traceback buried the log (565 tracebacks
in 5 minutes). Instead the first failure of an episode logs one warning ("store unavailable
since 12:00:01, 1 failure: StoreBusy: ..."), later ones only count, and the recovery logs one
summary line with the count and how long it lasted.

- One episode per dependency: `outage_of` sorts `StoreError` (including `StoreBusy`) into
  "store" and `BlobError` (not `BlobNotFound`, a missing object, which is no outage) into
  "blob store". Any other exception is no outage: the caller logs it with its traceback.
- Recovery is declared when something succeeds after nothing has failed for `quiet` seconds,
  not at the first success: while SQLite's write lock is held elsewhere, reads still succeed,
  so a tick that only reads would end the episode between two failing writes and the log would
  flip between "unavailable" and "recovered" every tick. During an outage a retry fails at
  least every `cap` (the longest back-off) + `slack` (the longest a failing try takes, e.g.
  the store's busy timeout) seconds, so `quiet` is twice that. The summary line thus comes
  `quiet` seconds late, but dates the outage by its first and last failures; work itself
  resumes at the first retry that succeeds.
- The back-off grows with the episode's failures (`base`, 2x, 4x, ... up to `cap`): callers
  wait `delay` before trying again what failed. A loop whose own step just succeeded goes back
  to its normal interval at once (reset on success); duties that keep failing keep backing off.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from backfill.errors import BlobError, BlobNotFound, StoreBusy, StoreError

STORE = "store"
BLOBS = "blob store"


def outage_of(exc: BaseException) -> str | None:
    """The dependency `exc` says is failing, or None when it is no outage."""
    if isinstance(exc, StoreError):
        return STORE
    if isinstance(exc, BlobError) and not isinstance(exc, BlobNotFound):
        return BLOBS
    return None


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


class Episode:
    """Failures of one dependency, from the first to the recovery."""

    def __init__(
        self,
        name: str,
        log: logging.Logger,
        *,
        base: float,
        cap: float,
        slack: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self._log = log
        self._base = base
        self._cap = max(cap, base)
        self.quiet = 2 * (self._cap + slack)
        self._clock = clock
        self.failures = 0  # in the current episode; 0: none open
        self._first = 0.0
        self._last = 0.0

    @property
    def open(self) -> bool:
        return self.failures > 0

    @property
    def delay(self) -> float:
        """How long to wait before trying again: `base` doubled per failure, up to `cap`."""
        if not self.failures:
            return self._base
        return min(self._cap, self._base * 2.0 ** min(self.failures - 1, 60))

    def failed(self, exc: BaseException) -> None:
        now = self._clock()
        self.failures += 1
        self._last = now
        if self.failures == 1:
            self._first = now
            self._log.warning(
                "%s unavailable since %s, 1 failure: %s: %s; backing off, logged again when "
                "it recovers",
                self.name,
                _when(now),
                type(exc).__name__,
                (str(exc).splitlines() or [""])[0],  # obstore adds a multi-line debug dump
                exc_info=None if isinstance(exc, StoreBusy) else exc,
            )
        else:
            self._log.debug("%s still unavailable, %d failures", self.name, self.failures)

    def succeeded(self) -> None:
        if self.failures and self._clock() - self._last >= self.quiet:
            self._log.warning(
                "%s available again: unavailable from %s to %s (%.0f s), %d failures",
                self.name,
                _when(self._first),
                _when(self._last),
                self._last - self._first,
                self.failures,
            )
            self.failures = 0


class Outages:
    """The episodes of one background loop, one per dependency."""

    def __init__(
        self,
        log: logging.Logger,
        *,
        base: float,
        cap: float,
        slack: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._base = base
        self._episodes = {
            name: Episode(name, log, base=base, cap=cap, slack=slack, clock=clock)
            for name in (STORE, BLOBS)
        }

    def failed(self, exc: BaseException) -> bool:
        """Count `exc` if it is an outage (True); False: no outage, the caller logs it."""
        name = outage_of(exc)
        if name is None:
            return False
        self._episodes[name].failed(exc)
        return True

    def succeeded(self) -> None:
        for episode in self._episodes.values():
            episode.succeeded()

    @property
    def failing(self) -> bool:
        return any(e.open for e in self._episodes.values())

    @property
    def delay(self) -> float:
        """The back-off of the worst open episode; `base` when none is open."""
        return max((e.delay for e in self._episodes.values() if e.open), default=self._base)
