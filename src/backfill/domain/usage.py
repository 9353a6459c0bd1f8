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
    at: int  # Unix seconds the work finished (a segment: when it was recorded)
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
