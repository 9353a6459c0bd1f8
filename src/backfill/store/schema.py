"""The tables of the SQL store, in SQLAlchemy Core.

Design decisions:
- Portable types only, so one schema serves SQLite and PostgreSQL. Timestamps are Unix seconds
  in BigInteger columns (the domain speaks ints); lease expiry is a Float because leases are
  measured in fractions of a second.
- Every listed table has a `seq` surrogate key that grows with insertion: list cursors and
  "oldest first" scans order by it, never by the random public ids. It is a BigInteger on
  PostgreSQL (BIGSERIAL) and an INTEGER on SQLite, where only `INTEGER PRIMARY KEY` is the
  rowid alias that autoincrements.
- `start`, `end` and `count` are SQL keywords; the shard columns are called `byte_start`,
  `byte_end` and `request_count` and mapped back to the `Shard` fields in `sql.py`.
- `batches` keeps its usage as four counters (added to by every recorded segment in the same
  transaction) rather than summing segments on every read.
- Idempotency keys are unique per project; NULL keys never collide on either database.
- The migrations in `migrations/versions/` create exactly these tables; a test compares them.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
)

# INTEGER PRIMARY KEY on SQLite (the autoincrementing rowid), BIGSERIAL on PostgreSQL.
SeqType = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData()

projects = Table(
    "projects",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(255), nullable=False, unique=True),
    Column("created_at", BigInteger, nullable=False),
    # quotas and limits set with `backfill projects set` (None: the server's defaults)
    Column("settings", JSON(none_as_null=True), nullable=True),
)

# Keys are stored as SHA-256 digests; `id` and the short `prefix` name them for people.
# `source`: cli | flag (valid only while given at serve start) | legacy (made before 0003).
api_keys = Table(
    "api_keys",
    metadata,
    Column("key_hash", String(128), primary_key=True),
    Column("project_id", String(64), nullable=False, index=True),
    Column("created_at", BigInteger, nullable=False),
    Column("id", String(64), nullable=False),
    Column("prefix", String(32), nullable=True),
    Column("source", String(16), nullable=False, server_default="legacy"),
    Column("revoked_at", BigInteger, nullable=True),
    # an admin key (`backfill keys create --admin`) reads every project's usage and costs
    Column("admin", Boolean, nullable=False, server_default=false()),
    Index("ix_api_keys_id", "id", unique=True),
)

files = Table(
    "files",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("project_id", String(64), nullable=False, index=True),
    Column("filename", Text, nullable=False),
    Column("purpose", String(64), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=True, index=True),
    Column("blob_path", Text, nullable=False),
    Column("status", String(32), nullable=False),
    Column("status_details", Text, nullable=True),
)

batches = Table(
    "batches",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("project_id", String(64), nullable=False, index=True),
    Column("endpoint", String(128), nullable=False),
    Column("model", Text, nullable=True),
    Column("input_file_id", String(64), nullable=False, index=True),
    Column("completion_window", String(32), nullable=False),
    Column("status", String(32), nullable=False, index=True),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("in_progress_at", BigInteger, nullable=True),
    Column("finalizing_at", BigInteger, nullable=True),
    Column("completed_at", BigInteger, nullable=True),
    Column("failed_at", BigInteger, nullable=True),
    Column("expired_at", BigInteger, nullable=True),
    Column("cancelling_at", BigInteger, nullable=True),
    Column("cancelled_at", BigInteger, nullable=True),
    Column("total", BigInteger, nullable=False, default=0),
    Column("completed", BigInteger, nullable=False, default=0),
    Column("failed", BigInteger, nullable=False, default=0),
    Column("input_tokens", BigInteger, nullable=False, default=0),
    Column("cached_tokens", BigInteger, nullable=False, default=0),
    Column("output_tokens", BigInteger, nullable=False, default=0),
    Column("reasoning_tokens", BigInteger, nullable=False, default=0),
    Column("metadata", JSON(none_as_null=True), nullable=True),
    Column("errors", JSON(none_as_null=True), nullable=True),
    Column("output_expires_after", BigInteger, nullable=True),
    Column("stop_reason", String(32), nullable=True),
    Column("output_file_id", String(64), nullable=True),
    Column("error_file_id", String(64), nullable=True),
    Column("idempotency_key", String(255), nullable=True),
    Column("request_hash", String(128), nullable=True),
    Column("warning", Text, nullable=True),
    # who made it, what it is estimated to use (quotas), and what it cost (the ledger's sums)
    Column("api_key_id", String(64), nullable=True),
    Column("enqueued_tokens", BigInteger, nullable=True),
    Column("cost_micros", BigInteger, nullable=False, server_default="0"),
    Column("list_micros", BigInteger, nullable=False, server_default="0"),
    Column("currency", String(8), nullable=True),
    UniqueConstraint("project_id", "idempotency_key", name="uq_batches_idempotency"),
)

shards = Table(
    "shards",
    metadata,
    Column("batch_id", String(64), nullable=False),
    Column("idx", Integer, nullable=False),
    Column("first_line", BigInteger, nullable=False),
    Column("byte_start", BigInteger, nullable=False),
    Column("byte_end", BigInteger, nullable=False),
    Column("request_count", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),
    Column("lease_owner", String(128), nullable=True),
    Column("lease_token", String(128), nullable=True),
    Column("lease_expires_at", Float, nullable=True),
    Column("done", BigInteger, nullable=False, default=0),
    PrimaryKeyConstraint("batch_id", "idx", name="pk_shards"),
    Index("ix_shards_status", "status"),
)

segments = Table(
    "segments",
    metadata,
    Column("batch_id", String(64), nullable=False),
    Column("shard_index", Integer, nullable=False),
    Column("seq", Integer, nullable=False),
    Column("blob_path", Text, nullable=False),
    Column("completed", BigInteger, nullable=False),
    Column("failed", BigInteger, nullable=False),
    Column("input_tokens", BigInteger, nullable=False, default=0),
    Column("cached_tokens", BigInteger, nullable=False, default=0),
    Column("output_tokens", BigInteger, nullable=False, default=0),
    Column("reasoning_tokens", BigInteger, nullable=False, default=0),
    Column("owner", String(128), nullable=True),
    Column("engine_ms", BigInteger, nullable=False, server_default="0"),
    PrimaryKeyConstraint("batch_id", "shard_index", "seq", name="pk_segments"),
)

# Duty claims: one row per named background duty (finalize:<batch>, validate:<batch>, ...),
# held by one process until expires_at, so several schedulers never run the same duty at once.
claims = Table(
    "claims",
    metadata,
    Column("name", String(255), primary_key=True),
    Column("owner", String(128), nullable=False),
    Column("expires_at", Float, nullable=False),
)

# The governor's planned real-time peak per model (`dispatch/governor.py`), saved every so often
# and read at start so a fresh start does not begin blind; the reader ignores old rows.
governor_peaks = Table(
    "governor_peaks",
    metadata,
    Column("model", String(255), primary_key=True),
    Column("reference", Float, nullable=False),
    Column("saved_at", Float, nullable=False),  # Unix seconds
)

# Webhook endpoints, per project (`domain/webhooks.py`). `event_types` is a comma-separated
# list; `removed_at` ends an endpoint (its pending deliveries then end as failed).
webhook_endpoints = Table(
    "webhook_endpoints",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("project_id", String(64), nullable=False, index=True),
    Column("name", Text, nullable=False, default=""),
    Column("url", Text, nullable=False),
    Column("secret", Text, nullable=False),
    Column("event_types", Text, nullable=False),
    Column("source", String(16), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    Column("removed_at", BigInteger, nullable=True),
    # a rotated-out secret still signs (beside the new one) until `previous_secret_until`
    Column("previous_secret", Text, nullable=True),
    Column("previous_secret_until", BigInteger, nullable=True),
)

# The webhook outbox: one row per event and endpoint, written in the transaction that moves a
# batch to its terminal status. `next_attempt_at` is also the claim: a process that takes a row
# pushes it past its attempt, and `lease_token` fences what that attempt writes.
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("event_id", String(64), nullable=False),
    Column("event_type", String(64), nullable=False),
    Column("batch_id", String(64), nullable=False),
    Column("project_id", String(64), nullable=False),
    Column("endpoint_id", String(64), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Float, nullable=True),  # NULL: delivered or given up
    Column("lease_token", String(128), nullable=True),
    Column("delivered_at", BigInteger, nullable=True),
    Column("gave_up_at", BigInteger, nullable=True),
    Column("last_status", Integer, nullable=True),
    Column("last_error", Text, nullable=True),
    UniqueConstraint("event_id", "endpoint_id", name="uq_webhook_deliveries_event_endpoint"),
    Index("ix_webhook_deliveries_next", "next_attempt_at"),
    Index("ix_webhook_deliveries_endpoint", "endpoint_id"),
)

# The usage ledger (`domain/usage.py`): one row per recorded segment or real-time request,
# unique by `ref`, so nothing is counted twice; reports sum it by `at`.
usage_ledger = Table(
    "usage_ledger",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("ref", String(255), nullable=False, unique=True),
    Column("kind", String(16), nullable=False),
    Column("project_id", String(64), nullable=False),
    Column("api_key_id", String(64), nullable=True),
    Column("model", Text, nullable=False),
    Column("endpoint", String(128), nullable=False),
    Column("batch_id", String(64), nullable=True),
    Column("at", BigInteger, nullable=False),
    Column("requests", BigInteger, nullable=False),
    Column("input_tokens", BigInteger, nullable=False),
    Column("cached_tokens", BigInteger, nullable=False),
    Column("output_tokens", BigInteger, nullable=False),
    Column("reasoning_tokens", BigInteger, nullable=False),
    Column("engine_ms", BigInteger, nullable=False),
    Column("cost_micros", BigInteger, nullable=False),
    Column("list_micros", BigInteger, nullable=False),
    Column("currency", String(8), nullable=True),
    Index("ix_usage_ledger_at", "at"),
    Index("ix_usage_ledger_project_at", "project_id", "at"),
    Index("ix_usage_ledger_batch", "batch_id"),
)
