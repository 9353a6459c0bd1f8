"""Batch statuses and the transitions between them, as data; why a running batch stops.

```
validating -> in_progress -> finalizing -> completed
validating -> failed
validating | in_progress -> expired
validating | in_progress | finalizing -> cancelling -> cancelled
finalizing -> in_progress
```
`finalizing -> expired` and `finalizing -> cancelled` are allowed too: a batch that was being
cancelled or expired is finalized under its own final status. `finalizing -> in_progress`
runs again the lines that finalizing found without an outcome. The stores refuse a transition
this table does not list (`store.rules.check_transition`), so the table is the rule, not a
picture of it.

An expiring batch stays `in_progress` with `stop_reason = expired` until no worker holds a
lease on it; cancel has a status of its own (`cancelling`) instead.
"""

from __future__ import annotations

from enum import StrEnum


class BatchStatus(StrEnum):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


S = BatchStatus

TRANSITIONS: dict[BatchStatus, frozenset[BatchStatus]] = {
    S.VALIDATING: frozenset({S.IN_PROGRESS, S.FAILED, S.CANCELLING, S.EXPIRED}),
    S.IN_PROGRESS: frozenset({S.FINALIZING, S.EXPIRED, S.CANCELLING}),
    # back to in_progress: finalizing found lines with no outcome, which run again first
    S.FINALIZING: frozenset({S.COMPLETED, S.EXPIRED, S.CANCELLING, S.CANCELLED, S.IN_PROGRESS}),
    S.CANCELLING: frozenset({S.CANCELLED}),
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset(),
    S.EXPIRED: frozenset(),
    S.CANCELLED: frozenset(),
}


def can_transition(src: BatchStatus, dst: BatchStatus) -> bool:
    return dst in TRANSITIONS[src]


def sources_of(dst: BatchStatus) -> frozenset[BatchStatus]:
    """Every status from which `dst` may be entered."""
    return frozenset(s for s, nxt in TRANSITIONS.items() if dst in nxt)


TERMINAL: frozenset[BatchStatus] = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)
CANCELLABLE: frozenset[BatchStatus] = sources_of(S.CANCELLING)


class StopReason(StrEnum):
    """Why a running batch is being stopped (the batch's `stop_reason`, stored as its value)."""

    EXPIRED = "expired"
