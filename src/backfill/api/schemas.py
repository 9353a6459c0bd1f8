"""HTTP shapes: request bodies (pydantic) and records rendered as the contract's JSON objects.

Responses are built as plain dicts, not pydantic models: the shapes are fixed by the OpenAI
API, every field must be present with an explicit `null`, and building a dict by hand is both
the clearest statement of the wire format and the cheapest thing to serialize.

Request bodies are pydantic models with `extra="forbid"` so an unknown argument is a 400
("Unrecognized request argument supplied: X"), as OpenAI does. Limits that need OpenAI's own
wording (metadata sizes, expiry ranges) are checked by hand in `check_metadata` and friends.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr

from backfill.domain.ordering import estimated_completion
from backfill.domain.pricing import micros_to_amount
from backfill.domain.records import BatchRecord, Cost, FileRecord
from backfill.domain.statuses import BatchStatus
from backfill.errors import InvalidRequest

MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MIN_EXPIRES_AFTER = 3600
MAX_EXPIRES_AFTER = 30 * 86400


class ExpiresAfter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    anchor: Literal["created_at"]
    seconds: StrictInt


class CreateBatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: StrictStr
    endpoint: StrictStr
    completion_window: StrictStr
    metadata: dict[StrictStr, StrictStr] | None = None
    output_expires_after: ExpiresAfter | None = None


def check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > MAX_METADATA_PAIRS:
        raise InvalidRequest(
            f"Invalid 'metadata': too many properties. Expected at most "
            f"{MAX_METADATA_PAIRS} properties, but got {len(metadata)} instead.",
            param="metadata",
            code="invalid_metadata",
        )
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY:
            raise InvalidRequest(
                f"Invalid 'metadata': key {key[:20]!r}... is {len(key)} characters long; "
                f"keys may be at most {MAX_METADATA_KEY} characters.",
                param="metadata",
                code="invalid_metadata",
            )
        if len(value) > MAX_METADATA_VALUE:
            raise InvalidRequest(
                f"Invalid 'metadata': the value of {key!r} is {len(value)} characters long; "
                f"values may be at most {MAX_METADATA_VALUE} characters.",
                param="metadata",
                code="invalid_metadata",
            )


def check_expires_after_seconds(seconds: int, param: str) -> int:
    if not MIN_EXPIRES_AFTER <= seconds <= MAX_EXPIRES_AFTER:
        raise InvalidRequest(
            f"Invalid '{param}': {seconds} is out of range; expected between "
            f"{MIN_EXPIRES_AFTER} (1 hour) and {MAX_EXPIRES_AFTER} (30 days) seconds.",
            param=param,
            code="invalid_value",
        )
    return seconds


# -- response objects ---------------------------------------------------------------------------


def file_object(f: FileRecord) -> dict[str, Any]:
    return {
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": f.created_at,
        "expires_at": f.expires_at,
        "filename": f.filename,
        "purpose": f.purpose,
        "status": f.status,
        "status_details": f.status_details,
    }


def batch_object(b: BatchRecord) -> dict[str, Any]:
    return {
        "id": b.id,
        "object": "batch",
        "endpoint": b.endpoint,
        "model": b.model,
        "errors": (
            {"object": "list", "data": [e.to_dict() for e in b.errors]}
            if b.errors is not None
            else None
        ),
        "input_file_id": b.input_file_id,
        "completion_window": b.completion_window,
        "status": str(b.status),
        "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id,
        "created_at": b.created_at,
        "in_progress_at": b.in_progress_at,
        "expires_at": b.expires_at,
        "finalizing_at": b.finalizing_at,
        "completed_at": b.completed_at,
        "failed_at": b.failed_at,
        "expired_at": b.expired_at,
        "cancelling_at": b.cancelling_at,
        "cancelled_at": b.cancelled_at,
        "request_counts": {"total": b.total, "completed": b.completed, "failed": b.failed},
        "usage": b.usage.to_dict(),
        "metadata": b.metadata,
        # Extensions (not in the OpenAI API; the SDK keeps them in `model_extra`):
        "estimated_completion_at": _eta(b),
        "warning": b.warning,
        "cost": cost_object(b.cost),
    }


def cost_object(cost: Cost | None) -> dict[str, Any] | None:
    """A batch's cost so far (extension): what it is billed, and what the same work costs in
    real time, each as the `amount` object of OpenAI's costs API (`value` a number in units of
    `currency`, lowercase). Null while nothing priced was recorded (no price for the model)."""
    if cost is None:
        return None
    return {
        "amount": {"value": micros_to_amount(cost.billed_micros), "currency": cost.currency},
        "realtime_equivalent": {
            "value": micros_to_amount(cost.list_micros),
            "currency": cost.currency,
        },
    }


def _eta(b: BatchRecord) -> int | None:
    """When a running batch should finish at the rate it has run so far."""
    if b.status is not BatchStatus.IN_PROGRESS:
        return None
    eta = estimated_completion(b.total, b.completed + b.failed, b.in_progress_at, time.time())
    return None if eta is None else int(eta)


def list_object(data: Sequence[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": list(data),
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


def deleted_file(file_id: str) -> dict[str, Any]:
    return {"id": file_id, "object": "file", "deleted": True}
