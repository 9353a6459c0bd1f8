"""Rules every store applies the same way: which moves `transition` may make, what
`transition`/`update_batch` may set, and the messages of the errors the stores raise on purpose.

A `transition` whose sources include one the target cannot be entered from
(`domain.statuses.TRANSITIONS`) is a bug in the caller, refused with `ValueError` before the
store is touched, whether or not the batch is in that source right now.

Both stores accept the `BatchRecord` field names as keyword arguments. Identity (`id`,
`project_id`, `created_at`) never changes and `status` only changes through `transition`'s
`to_status`, so those names are refused, as is anything that is not a field: a typo must fail
loudly on the memory store exactly as it would on SQL. Values are normalized here (errors to a
tuple of `BatchError`, metadata copied) so both backends store the same thing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import fields
from typing import Any

from backfill.domain.records import BatchError, BatchRecord, Usage
from backfill.domain.statuses import BatchStatus, can_transition

IDEMPOTENCY_CONFLICT = "The Idempotency-Key was already used with a different request."
KEY_CONFLICT = "This API key is already registered to another project."

FIXED_FIELDS = frozenset({"id", "project_id", "created_at", "status"})
UPDATABLE_FIELDS = frozenset(f.name for f in fields(BatchRecord)) - FIXED_FIELDS


def to_errors(
    value: Iterable[BatchError | Mapping[str, Any]] | None,
) -> tuple[BatchError, ...] | None:
    if value is None:
        return None
    return tuple(e if isinstance(e, BatchError) else BatchError(**e) for e in value)


def check_transition(
    from_statuses: Iterable[BatchStatus], to_status: BatchStatus
) -> tuple[list[BatchStatus], BatchStatus]:
    """The sources and target as statuses, if the table allows every move (else ValueError)."""
    target = BatchStatus(to_status)
    sources = [BatchStatus(s) for s in from_statuses]
    refused = [s.value for s in sources if not can_transition(s, target)]
    if refused:
        raise ValueError(f"batch status cannot move from {', '.join(refused)} to {target.value}")
    return sources, target


def check_batch_fields(changes: Mapping[str, Any]) -> dict[str, Any]:
    """Validate and normalize keyword changes to a batch (TypeError on an unknown name)."""
    unknown = set(changes) - UPDATABLE_FIELDS
    if unknown:
        raise TypeError(f"cannot set batch field(s): {', '.join(sorted(unknown))}")
    out = dict(changes)
    if "errors" in out:
        out["errors"] = to_errors(out["errors"])
    if out.get("metadata") is not None:
        out["metadata"] = dict(out["metadata"])
    if "usage" in out and not isinstance(out["usage"], Usage):
        raise TypeError("usage must be a Usage")
    return out
