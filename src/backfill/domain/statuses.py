"""Batch statuses and the transitions between them, as data.

```
validating -> in_progress -> finalizing -> completed
validating -> failed
in_progress -> expired
validating | in_progress | finalizing -> cancelling -> cancelled
```
`finalizing -> expired` and `finalizing -> cancelled` are allowed too: a batch that was being
cancelled or expired is finalized under its own final status.
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
    S.FINALIZING: frozenset({S.COMPLETED, S.EXPIRED, S.CANCELLING, S.CANCELLED}),
    S.CANCELLING: frozenset({S.CANCELLED}),
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset(),
    S.EXPIRED: frozenset(),
    S.CANCELLED: frozenset(),
}

TERMINAL: frozenset[BatchStatus] = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)
CANCELLABLE: frozenset[BatchStatus] = frozenset({S.VALIDATING, S.IN_PROGRESS, S.FINALIZING})

# The timestamp field that entering each status sets.
TIMESTAMP_FIELD: dict[BatchStatus, str] = {
    S.IN_PROGRESS: "in_progress_at",
    S.FINALIZING: "finalizing_at",
    S.COMPLETED: "completed_at",
    S.FAILED: "failed_at",
    S.EXPIRED: "expired_at",
    S.CANCELLING: "cancelling_at",
    S.CANCELLED: "cancelled_at",
}


def can_transition(src: BatchStatus, dst: BatchStatus) -> bool:
    return dst in TRANSITIONS[src]


def sources_of(dst: BatchStatus) -> frozenset[BatchStatus]:
    """Every status from which `dst` may be entered."""
    return frozenset(s for s, nxt in TRANSITIONS.items() if dst in nxt)
