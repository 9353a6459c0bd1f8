"""The usage ledger's entries: what one piece of finished work used, recorded exactly once.

A ledger entry is written by whoever finishes the work, in the same transaction that makes the
work count, under an idempotency key (`ref`) the store refuses to record twice:
- batch work: one entry per recorded result segment (`seg:<batch>:<shard>:<seq>`), written with
  the segment (`Store.record_segment`), so a re-run line after a crash, a retried checkpoint or
  a second worker can never count twice: only recorded segments become output lines, and each
  segment is recorded once;
- real time: one entry per gateway request (`rt:<request id>`), when its answer has ended.

Entries carry tokens, request counts and engine time, and their cost as priced when they were
recorded (integer micro-units of `currency`: `cost_micros` billed, `list_micros` what the same
work costs at the real-time price), so a later price change does not rewrite the past. Reports
sum entries; nothing is computed from the batches or files on read.
"""

from __future__ import annotations

from dataclasses import dataclass

from backfill.domain.records import Cost, Segment, Usage

#: `kind` of an entry
BATCH = "batch"
REALTIME = "realtime"


@dataclass(frozen=True, slots=True)
class UsageEntry:
    ref: str  # idempotency key: `seg:<batch>:<shard>:<seq>` or `rt:<request id>`
    kind: str  # BATCH | REALTIME
    project_id: str
    model: str
    endpoint: str  # "/v1/chat/completions", "/v1/embeddings", ...
    at: int  # Unix seconds: a segment's when the worker cut it; a real-time request's arrival
    api_key_id: str | None = None
    batch_id: str | None = None
    requests: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    engine_ms: int = 0  # milliseconds the requests spent at the engine
    cost_micros: int = 0  # billed (batch: at the batch discount), micro-units of `currency`
    list_micros: int = 0  # the real-time price of the same work
    currency: str | None = None  # None: the model has no price
    seq: int = 0  # the store's insertion order (set by the store)


def segment_ref(batch_id: str, shard_index: int, seq: int) -> str:
    return f"seg:{batch_id}:{shard_index}:{seq}"


def realtime_ref(request_id: str) -> str:
    return f"rt:{request_id}"


def segment_usage(
    segment: Segment, project_id: str, api_key_id: str | None, model: str | None, endpoint: str
) -> UsageEntry:
    """The ledger entry of a recorded segment of a batch (`project_id`..`endpoint`: the
    batch's): its lines (completed and failed) are its requests."""
    return _entry(
        segment_ref(segment.batch_id, segment.shard_index, segment.seq),
        BATCH,
        project_id,
        api_key_id,
        model or "",
        endpoint,
        segment.batch_id,
        segment.at,
        segment.completed + segment.failed,
        segment.usage,
        segment.engine_ms,
        segment.cost,
    )


def realtime_usage(
    request_id: str,
    *,
    project_id: str,
    api_key_id: str | None,
    model: str,
    endpoint: str,
    at: int,
    usage: Usage,
    engine_ms: int,
    cost: Cost | None,
) -> UsageEntry:
    """The ledger entry of one real-time request through the gateway."""
    return _entry(
        realtime_ref(request_id),
        REALTIME,
        project_id,
        api_key_id,
        model,
        endpoint,
        None,
        at,
        1,
        usage,
        engine_ms,
        cost,
    )


def _entry(
    ref: str,
    kind: str,
    project_id: str,
    api_key_id: str | None,
    model: str,
    endpoint: str,
    batch_id: str | None,
    at: int,
    requests: int,
    usage: Usage,
    engine_ms: int,
    cost: Cost | None,
) -> UsageEntry:
    return UsageEntry(
        ref=ref,
        kind=kind,
        project_id=project_id,
        model=model,
        endpoint=endpoint,
        at=at,
        api_key_id=api_key_id,
        batch_id=batch_id,
        requests=requests,
        input_tokens=usage.input_tokens,
        cached_tokens=usage.cached_tokens,
        output_tokens=usage.output_tokens,
        reasoning_tokens=usage.reasoning_tokens,
        engine_ms=engine_ms,
        cost_micros=0 if cost is None else cost.billed_micros,
        list_micros=0 if cost is None else cost.list_micros,
        currency=None if cost is None else cost.currency,
    )
