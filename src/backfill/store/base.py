"""The store interface every metadata backend implements.

The store is synchronous: SQL drivers are, and callers on the event loop hop to a thread
(`asyncio.to_thread`). Every method is one short transaction. Conditional updates
(`... WHERE status IN (...)`, `... WHERE lease_token = ?`) make each state change safe when many
processes run the same duty: the loser sees `None`/`False` and moves on.

Writes that follow a lease are *fenced*: they name the lease token and do nothing (return
False) when the token no longer holds the shard, so a worker that lost its lease cannot commit.

Time is passed in (`now`, Unix seconds) so tests can drive a fake clock.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from backfill.domain.projects import ProjectLoad, ProjectSettings
from backfill.domain.records import (
    BatchRecord,
    FileRecord,
    Project,
    Segment,
    Shard,
    Usage,
)
from backfill.domain.statuses import BatchStatus
from backfill.domain.usage import UsageEntry
from backfill.domain.usage_reports import UsageTotal
from backfill.domain.webhooks import WebhookDelivery, WebhookEndpoint

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: list[T]
    has_more: bool


@dataclass(frozen=True, slots=True)
class ApiKey:
    """What the store knows of an API key: never the key itself, only its digest's row."""

    id: str  # `key_...`, the name `backfill keys revoke` takes
    project_id: str
    project: str  # the project's name
    prefix: str | None  # the key's first characters, for people (None: made before ids)
    source: str  # KEY_SOURCES
    created_at: int
    revoked_at: int | None = None
    admin: bool = False  # reads every project's usage and costs (`keys create --admin`)


@dataclass(frozen=True, slots=True)
class GovernorPeak:
    """A model's planned real-time peak (the governor's `reference`, in concurrent requests),
    as last saved by a governor."""

    model: str
    reference: float
    saved_at: float  # Unix seconds


#: `cli`: made by `backfill keys create`; `flag`: given at serve start (`--api-key`, the config
#: file, `BACKFILL_API_KEYS`), valid only while given; `legacy`: made before keys had ids
KEY_SOURCES = ("cli", "flag", "legacy")


class Store(Protocol):
    # -- lifecycle ---------------------------------------------------------------------------
    def migrate(self) -> None:
        """Create or upgrade the schema (idempotent; safe to call from every process)."""

    def close(self) -> None: ...

    # -- projects and keys -------------------------------------------------------------------
    def ensure_project(self, name: str) -> Project:
        """The project called `name`, created if missing."""

    def add_api_key(
        self,
        project_id: str,
        key_hash: str,
        now: int,
        *,
        prefix: str | None = None,
        source: str = "cli",
        admin: bool = False,
    ) -> None:
        """Register a key (by its SHA-256 hex digest) for a project; an `admin` key also reads
        every project's usage and costs. Idempotent. `Conflict` if the digest belongs to another
        project. Registering an existing key with source `flag`
        makes it a flag key and valid again (a key given at serve start works while given)."""

    def project_for_key(self, key_hash: str) -> Project | None:
        """The key's project, with the key's id and admin flag (`Project.key_id`, `.admin`);
        None for an unknown or revoked key."""

    # -- project settings: quotas and limits (domain/projects.py) ----------------------------
    def project_settings(self, project_id: str) -> ProjectSettings | None:
        """The project's settings (empty ones when none are set); None for an unknown id."""

    def set_project_settings(self, name: str, settings: ProjectSettings) -> Project | None:
        """Replace the settings of the project called `name`; None if there is no such
        project."""

    def projects(self) -> list[tuple[Project, ProjectSettings]]:
        """Every project with its settings, by name."""

    def project_load(self, project_id: str) -> ProjectLoad:
        """The project's unfinished batches (validating, in_progress, finalizing,
        cancelling) and the sum of their `enqueued_tokens` per model (batches still
        validating have none yet)."""

    # -- files -------------------------------------------------------------------------------
    def insert_file(self, file: FileRecord) -> None: ...

    def get_file(self, file_id: str, project_id: str | None = None) -> FileRecord | None:
        """The file, or None if unknown or (when project_id is given) another project's."""

    def list_files(
        self,
        project_id: str,
        *,
        purpose: str | None = None,
        order: str = "desc",
        after: str | None = None,
        limit: int = 10000,
    ) -> Page[FileRecord]:
        """Files in creation order (`asc`/`desc`), strictly after the file `after`."""

    def delete_file(self, file_id: str, project_id: str | None = None) -> FileRecord | None:
        """Remove the file's row and return it (None if not found)."""

    def expired_files(self, now: int, limit: int) -> list[FileRecord]:
        """Files whose expires_at has passed."""

    def file_in_use(self, file_id: str) -> bool:
        """True if a non-terminal batch reads this file as its input."""

    # -- batches -----------------------------------------------------------------------------
    def insert_batch(
        self,
        batch: BatchRecord,
        *,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
    ) -> BatchRecord:
        """Insert `batch`. With an idempotency key already used by the same project, return the
        batch created then instead (raise `Conflict` if `request_hash` differs). A new batch
        that would give its project more unfinished batches than its `max_active_batches`
        raises `QuotaExceeded` (`active_batch_limit_exceeded`), checked in the same
        transaction as the insert."""

    def get_batch(self, batch_id: str, project_id: str | None = None) -> BatchRecord | None: ...

    def list_batches(
        self, project_id: str, *, after: str | None = None, limit: int = 20
    ) -> Page[BatchRecord]:
        """Newest first, strictly after the batch `after`."""

    def batches_in(self, statuses: Iterable[BatchStatus], limit: int = 100) -> list[BatchRecord]:
        """Batches in any of `statuses`, oldest first (scheduler scans)."""

    def transition(  # a terminal status also writes the batch's webhook deliveries
        self,
        batch_id: str,
        from_statuses: Iterable[BatchStatus],
        to_status: BatchStatus,
        **fields: Any,
    ) -> BatchRecord | None:
        """Move the batch to `to_status` if it is in one of `from_statuses`, setting `fields`
        (timestamps, output_file_id, errors, model, total, stop_reason, ...) in the same write.
        Returns the updated batch, or None if the batch was not in a source status.
        `ValueError` if `TRANSITIONS` does not allow the move from every source."""

    def update_batch(
        self, batch_id: str, expect_statuses: Iterable[BatchStatus], **fields: Any
    ) -> BatchRecord | None:
        """Set `fields` without changing status, if the batch is in one of `expect_statuses`."""

    def start_batch(
        self,
        batch_id: str,
        shards: Sequence[Shard],
        *,
        model: str | None,
        total: int,
        now: int,
        enqueued_tokens: int | None = None,
    ) -> BatchRecord | None:
        """validating -> in_progress, inserting its shards and recording `enqueued_tokens`, in
        one transaction. None if the batch is no longer validating (e.g. cancelled meanwhile).

        With `enqueued_tokens`, the project's token limit for `model` is checked in the same
        transaction, serialized per project (PostgreSQL: the project's row is locked first;
        SQLite: one writer at a time): if the enqueued tokens of its other unfinished batches
        of the model plus these pass the limit, nothing is written and `QuotaExceeded`
        (`token_limit_exceeded`, OpenAI's message) is raised."""

    # -- shards and leases -------------------------------------------------------------------
    def lease_shard(
        self,
        owner: str,
        token: str,
        now: float,
        lease_seconds: float,
        weights: Mapping[str, float] | None = None,
        skip_models: Collection[str] | None = None,
    ) -> Shard | None:
        """Lease one shard of an `in_progress` batch without a stop_reason: a pending shard, or
        a leased one whose lease has expired. Batches are tried in the order of
        `backfill.domain.ordering.order_candidates` (at-risk first, then fair shares between
        projects by `weights` keyed by project name, then earliest deadline). Batches whose
        model is in `skip_models` (models with no room left in the asking worker) are not
        candidates; their live leases still count in the fair shares. None if there is
        nothing to lease."""

    def revoke_leases(self, batch_id: str) -> int:
        """End every lease on the batch's shards (leased -> pending), so a stalled worker can
        record nothing more. Called before a stopped batch is finalized. Returns how many."""

    def reopen_shards(self, batch_id: str, indexes: Iterable[int]) -> int:
        """Put finished shards back to pending (done -> pending), so the requests their
        segments do not account for run again. Returns how many were reopened."""

    # -- duty claims -------------------------------------------------------------------------
    def claim(self, name: str, owner: str, now: float, seconds: float) -> bool:
        """Take or renew the named claim (e.g. `finalize:batch_x`) until now + seconds. True
        if `owner` holds it now; False if another owner holds an unexpired claim."""

    def release_claim(self, name: str, owner: str) -> None:
        """Drop the claim if `owner` holds it."""

    def renew_lease(
        self, batch_id: str, index: int, token: str, now: float, lease_seconds: float
    ) -> bool:
        """Extend the lease; False if `token` no longer holds the shard."""

    def record_segment(self, segment: Segment, token: str) -> bool:
        """Fenced: record a flushed segment, add its counts and usage to the batch and its
        request count to the shard's `done`, all in one transaction. False if the lease is lost
        (nothing is written)."""

    def finish_shard(self, batch_id: str, index: int, token: str) -> bool:
        """Fenced: mark the shard done and drop the lease."""

    def release_shard(self, batch_id: str, index: int, token: str) -> bool:
        """Fenced: give the shard back (pending, no lease) so another worker can resume it."""

    def shards(self, batch_id: str) -> list[Shard]:
        """All shards of a batch, by index."""

    def segments(self, batch_id: str, index: int | None = None) -> list[Segment]:
        """Recorded segments of a batch (or one shard), by shard index then seq."""

    def usage_of(self, batch_id: str) -> Usage:
        """Sum of the recorded segments' usage (equals the batch's usage)."""

    # -- keys: listing and revocation ---------------------------------------------------------
    def list_api_keys(self, project: str | None = None) -> list[ApiKey]:
        """Every key (revoked ones too), or those of the project named `project`, by
        created_at then id."""

    def revoke_api_key(self, key_id: str, now: int) -> ApiKey | None:
        """Revoke the key (at `now`, unless it already was) and return it; None if unknown."""

    def revoke_flag_keys(self, keep: Collection[str], now: int) -> list[ApiKey]:
        """Revoke every unrevoked `flag` key whose digest is not in `keep`; return them."""

    # -- debris of finished batches -----------------------------------------------------------
    def terminal_batches_with_segments(self, limit: int) -> list[str]:
        """Ids of batches in a terminal status that still have shard or segment rows, oldest
        first: what a crash between finalizing and cleaning up left behind."""

    def delete_segments(self, batch_id: str) -> int:
        """Delete the batch's segment and shard rows if the batch is terminal (else nothing);
        return how many rows went. The batch row keeps its counts and usage (`usage_of` reads
        zero from then on)."""

    # -- webhooks (domain/webhooks.py) ------------------------------------------------------
    # A transition into a terminal status writes, in its own transaction, one delivery per
    # active endpoint of the batch's project that wants the event (the outbox).
    def add_webhook_endpoint(self, endpoint: WebhookEndpoint) -> None: ...

    def webhook_endpoints(self, project_id: str | None = None) -> list[WebhookEndpoint]:
        """Active (not removed) endpoints, oldest first; all projects' when `project_id` is
        None."""

    def get_webhook_endpoint(
        self, endpoint_id: str, project_id: str | None = None
    ) -> WebhookEndpoint | None:
        """An active endpoint (of `project_id`, when given)."""

    def remove_webhook_endpoint(
        self, endpoint_id: str, now: int, project_id: str | None = None
    ) -> WebhookEndpoint | None:
        """End an active endpoint; its pending deliveries end as failed when next claimed."""

    def update_webhook_endpoint(
        self,
        endpoint_id: str,
        now: int,
        project_id: str | None = None,
        **changes: Any,
    ) -> WebhookEndpoint | None:
        """Change an active endpoint's `url`, `name`, `event_types`, `secret`,
        `previous_secret`, `previous_secret_until` (None: unchanged); None if there is no such
        endpoint (of `project_id`, when given)."""

    def claim_webhook_deliveries(
        self, token: str, now: float, lease_seconds: float, limit: int
    ) -> list[WebhookDelivery]:
        """Take up to `limit` deliveries due at `now` for one attempt each (oldest first): each
        has `attempts` counted up, is held for `lease_seconds` under `token`, and comes with its
        endpoint's URL and secret. Deliveries of removed endpoints end as failed instead.
        Several processes never take the same delivery at once."""

    def finish_webhook_delivery(
        self,
        delivery_id: int,
        token: str,
        now: float,
        *,
        delivered: bool,
        status: int | None = None,
        error: str | None = None,
        retry_at: float | None = None,
    ) -> bool:
        """Record an attempt's outcome, fenced by `token`: delivered; or failed, to be tried
        again at `retry_at`, or given up when `retry_at` is None. False: the claim was lost
        (another process holds the delivery, or it ended)."""

    def webhook_deliveries(
        self,
        *,
        endpoint_id: str | None = None,
        batch_id: str | None = None,
        with_error: bool = False,
        limit: int = 100,
    ) -> list[WebhookDelivery]:
        """Deliveries, newest first (`with_error`: only those whose last attempt left an
        error)."""

    def webhook_delivery_counts(self, endpoint_id: str) -> dict[str, int]:
        """How many of the endpoint's deliveries are in each `WebhookDelivery.state` (every
        state of `DELIVERY_STATES` a key), counted by the store (SQL `COUNT`) without loading
        the rows."""

    def prune_webhook_deliveries(self, before: int) -> int:
        """Delete delivered and failed deliveries of events older than `before`."""

    # -- the usage ledger (domain/usage.py) ---------------------------------------------------
    def record_usage(self, entry: UsageEntry) -> bool:
        """Record `entry` unless an entry with its `ref` is recorded (True: recorded now)."""

    def usage_entries(
        self,
        *,
        start: int | None = None,
        end: int | None = None,
        project_id: str | None = None,
        batch_id: str | None = None,
        after_seq: int = 0,
        limit: int = 1000,
    ) -> list[UsageEntry]:
        """Entries with `start <= at < end` (of a project, of a batch), in recording order
        after `after_seq` (the `seq` of the last entry of the previous page)."""

    def usage_totals(
        self,
        *,
        start: int,
        end: int,
        width: int,
        group_by: Sequence[str] = (),
        project_ids: Sequence[str] | None = None,
        api_key_ids: Sequence[str] | None = None,
        models: Sequence[str] | None = None,
        endpoints: Sequence[str] | None = None,
        batch: bool | None = None,
    ) -> list[UsageTotal]:
        """Sums of the entries with `start <= at < end`, per bucket of `width` seconds counted
        from `start` and per value of the `group_by` keys (`domain/usage_reports.GROUP_KEYS`),
        aggregated by the store (SQL `GROUP BY`), only buckets and groups that have entries, in
        `usage_reports.sort_key` order. A filter of None keeps everything; `batch` keeps batch
        (True) or real-time (False) entries."""

    # -- the governor's reference peak (dispatch/governor.py) ---------------------------------
    def save_governor_peak(self, model: str, reference: float, now: float) -> None:
        """Store `reference` as `model`'s real-time peak, saved at `now` (replaces the last)."""

    def governor_peak(self, model: str) -> GovernorPeak | None:
        """The last peak saved for `model` (None: never); the reader judges its age."""
