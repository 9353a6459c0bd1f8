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
    # back to in_progress: finalizing found lines with no outcome, which run again first
    S.FINALIZING: frozenset({S.COMPLETED, S.EXPIRED, S.CANCELLING, S.CANCELLED, S.IN_PROGRESS}),
    S.CANCELLING: frozenset({S.CANCELLED}),
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset(),
    S.EXPIRED: frozenset(),
    S.CANCELLED: frozenset(),
}

TERMINAL: frozenset[BatchStatus] = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)
CANCELLABLE: frozenset[BatchStatus] = frozenset({S.VALIDATING, S.IN_PROGRESS, S.FINALIZING})


def can_transition(src: BatchStatus, dst: BatchStatus) -> bool:
    return dst in TRANSITIONS[src]


def sources_of(dst: BatchStatus) -> frozenset[BatchStatus]:
    """Every status from which `dst` may be entered."""
    return frozenset(s for s, nxt in TRANSITIONS.items() if dst in nxt)
