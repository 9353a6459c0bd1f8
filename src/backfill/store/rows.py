"""Rows <-> records: the mapping between the SQL columns and the domain dataclasses.

Kept apart from the queries so `sql.py` reads as the transactions it runs. Shard byte offsets
live in `byte_start`/`byte_end`/`request_count` (SQL keywords avoided), usage in four counter
columns, a batch's cost in `cost_micros`/`list_micros`/`currency` (NULL: nothing priced yet),
errors as a JSON list of `BatchError.to_dict()`, statuses as their string values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy.engine import RowMapping

from backfill.domain.records import (
    BatchError,
    BatchRecord,
    Cost,
    FileRecord,
    Segment,
    Shard,
    ShardStatus,
    Usage,
)
from backfill.domain.statuses import BatchStatus
from backfill.store.rules import check_batch_fields

USAGE_COLUMNS = ("input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens")


def file_record(row: RowMapping) -> FileRecord:
    return FileRecord(
        id=row["id"],
        project_id=row["project_id"],
        filename=row["filename"],
        purpose=row["purpose"],
        bytes=int(row["bytes"]),
        created_at=int(row["created_at"]),
        blob_path=row["blob_path"],
        expires_at=_int_or_none(row["expires_at"]),
        status=row["status"],
        status_details=row["status_details"],
    )


_BATCH_TIMES = (
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


def batch_record(row: RowMapping) -> BatchRecord:
    errors = row["errors"]
    metadata = row["metadata"]
    return BatchRecord(
        id=row["id"],
        project_id=row["project_id"],
        endpoint=row["endpoint"],
        input_file_id=row["input_file_id"],
        completion_window=row["completion_window"],
        status=BatchStatus(row["status"]),
        created_at=int(row["created_at"]),
        expires_at=int(row["expires_at"]),
        model=row["model"],
        output_file_id=row["output_file_id"],
        error_file_id=row["error_file_id"],
        total=int(row["total"]),
        completed=int(row["completed"]),
        failed=int(row["failed"]),
        usage=Usage(*(int(row[c]) for c in USAGE_COLUMNS)),
        metadata=None if metadata is None else dict(metadata),
        errors=None if errors is None else tuple(BatchError(**e) for e in errors),
        output_expires_after=_int_or_none(row["output_expires_after"]),
        stop_reason=row["stop_reason"],
        warning=row["warning"],
        api_key_id=row["api_key_id"],
        cost=cost_of(row),
        **{name: _int_or_none(row[name]) for name in _BATCH_TIMES},
    )


def batch_values(batch: BatchRecord) -> dict[str, Any]:
    values: dict[str, Any] = {
        "id": batch.id,
        "project_id": batch.project_id,
        "status": BatchStatus(batch.status).value,
        "created_at": batch.created_at,
    }
    changes = {
        name: getattr(batch, name)
        for name in (
            "endpoint",
            "input_file_id",
            "completion_window",
            "expires_at",
            "model",
            "output_file_id",
            "error_file_id",
            "total",
            "completed",
            "failed",
            "usage",
            "metadata",
            "errors",
            "output_expires_after",
            "stop_reason",
            "warning",
            "api_key_id",
            "cost",
            *_BATCH_TIMES,
        )
    }
    values.update(batch_changes(check_batch_fields(changes)))
    return values


def batch_changes(changes: Mapping[str, Any]) -> dict[str, Any]:
    """Normalized `BatchRecord` field changes -> column values."""
    values: dict[str, Any] = {}
    for name, value in changes.items():
        if name == "usage":
            values.update({c: getattr(value, c) for c in USAGE_COLUMNS})
        elif name == "cost":
            values.update(cost_values(value))
        elif name == "errors":
            values["errors"] = None if value is None else [e.to_dict() for e in value]
        else:
            values[name] = value
    return values


def cost_of(row: RowMapping) -> Cost | None:
    """A batch's cost columns; None while nothing priced was recorded (currency NULL)."""
    if row["currency"] is None:
        return None
    return Cost(row["currency"], int(row["cost_micros"]), int(row["list_micros"]))


def cost_values(cost: Cost | None) -> dict[str, Any]:
    if cost is None:
        return {"cost_micros": 0, "list_micros": 0, "currency": None}
    return {
        "cost_micros": cost.billed_micros,
        "list_micros": cost.list_micros,
        "currency": cost.currency,
    }


def shard_record(row: RowMapping) -> Shard:
    return Shard(
        batch_id=row["batch_id"],
        index=int(row["idx"]),
        first_line=int(row["first_line"]),
        start=int(row["byte_start"]),
        end=int(row["byte_end"]),
        count=int(row["request_count"]),
        status=ShardStatus(row["status"]),
        lease_owner=row["lease_owner"],
        lease_token=row["lease_token"],
        lease_expires_at=row["lease_expires_at"],
        done=int(row["done"]),
    )


def segment_record(row: RowMapping) -> Segment:
    return Segment(
        batch_id=row["batch_id"],
        shard_index=int(row["shard_index"]),
        seq=int(row["seq"]),
        blob_path=row["blob_path"],
        completed=int(row["completed"]),
        failed=int(row["failed"]),
        usage=Usage(*(int(row[c]) for c in USAGE_COLUMNS)),
        owner=row["owner"],
        engine_ms=int(row["engine_ms"]),
    )


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)
