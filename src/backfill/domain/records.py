"""Frozen values the store hands out and takes in.

These are the nouns of the system in the user's words: a project owns files and batches; a
batch is cut into shards; a worker leases a shard and writes its results as segments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from backfill.domain.statuses import BatchStatus


@dataclass(frozen=True, slots=True)
class Project:
    id: str
    name: str
    #: when looked up by an API key (`Store.project_for_key`): that key's id, and whether it is
    #: an admin key (reads every project's usage); not part of the project's identity
    key_id: str | None = field(default=None, compare=False)
    admin: bool = field(default=False, compare=False)


@dataclass(frozen=True, slots=True)
class FileRecord:
    id: str
    project_id: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    blob_path: str
    expires_at: int | None = None
    status: str = "processed"
    status_details: str | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.cached_tokens + other.cached_tokens,
            self.output_tokens + other.output_tokens,
            self.reasoning_tokens + other.reasoning_tokens,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "input_tokens_details": {"cached_tokens": self.cached_tokens},
            "output_tokens": self.output_tokens,
            "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
            "total_tokens": self.total_tokens,
        }


@dataclass(frozen=True, slots=True)
class Cost:
    """What some work cost, in integer micro-units (1e-6) of `currency` (`domain/pricing.py`):
    `billed_micros` at the price that applies to it (a batch's: the real-time price less the
    batch discount), `list_micros` at the real-time price (the batch's real-time equivalent)."""

    currency: str
    billed_micros: int = 0
    list_micros: int = 0

    def __add__(self, other: Cost) -> Cost:
        # one batch has one model, so one currency; a price table changed mid-batch to another
        # currency keeps the latest (documented in `domain/pricing.py`)
        return Cost(
            other.currency,
            self.billed_micros + other.billed_micros,
            self.list_micros + other.list_micros,
        )


@dataclass(frozen=True, slots=True)
class BatchError:
    code: str
    message: str
    param: str | None = None
    line: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


@dataclass(frozen=True, slots=True)
class BatchRecord:
    id: str
    project_id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: BatchStatus
    created_at: int
    expires_at: int
    model: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    usage: Usage = field(default_factory=Usage)
    metadata: dict[str, str] | None = None
    errors: tuple[BatchError, ...] | None = None
    output_expires_after: int | None = None
    # Internal: why a running batch is being stopped (a `StopReason`); cancel has its own status.
    stop_reason: str | None = None
    #: set after validation when the batch looks unable to finish inside its window
    warning: str | None = None
    #: the API key that created it (`Project.key_id` of the creating request)
    api_key_id: str | None = None
    #: what its recorded segments cost (the sum of their ledger entries); None: unpriced
    cost: Cost | None = None


class ShardStatus(StrEnum):
    PENDING = "pending"
    LEASED = "leased"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class Shard:
    """A contiguous run of valid requests of one batch's input file.

    `start`/`end` are byte offsets into the input file (end exclusive) so a worker reads only its
    own part; `first_line` is the 1-based input line number of the first request. `index` orders
    shards within the batch.
    """

    batch_id: str
    index: int
    first_line: int
    start: int
    end: int
    count: int
    status: ShardStatus = ShardStatus.PENDING
    lease_owner: str | None = None
    lease_token: str | None = None
    lease_expires_at: float | None = None
    done: int = 0


@dataclass(frozen=True, slots=True)
class Segment:
    """An append-only object of finished results of one shard, recorded under a lease."""

    batch_id: str
    shard_index: int
    seq: int
    blob_path: str
    completed: int
    failed: int
    usage: Usage = field(default_factory=Usage)
    #: the worker that recorded it (for operators: how work spread over workers)
    owner: str | None = None
    #: milliseconds its requests spent at the engine (every attempt), summed
    engine_ms: int = 0
    #: what its requests cost, priced by the worker; recorded in the segment's ledger entry
    #: and added to the batch's cost, not kept with the segment (None: the model has no price)
    cost: Cost | None = field(default=None, compare=False)
    #: Unix seconds its results were cut from the worker's buffer: its ledger entry's time
    #: (not kept with the segment either)
    at: int = field(default=0, compare=False)
