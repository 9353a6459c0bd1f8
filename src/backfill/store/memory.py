"""`Store` in memory: the twin of `SqlStore` for unit tests and `memory://`.

Design decisions:
- Plain dicts of frozen records under one `threading.Lock`; each method holds the lock for its
  whole body, which is the in-memory equivalent of one transaction. Callers use the store from
  many threads (`asyncio.to_thread`), exactly as they use the SQL store.
- Records are immutable, so handing them out is safe; the two mutable parts (metadata dicts)
  are copied on the way in and out so a caller can never change stored state by accident.
- A monotonic `seq` per insert plays the role of the SQL autoincrement key: cursors and
  "oldest first" order by it, never by ids.
- Semantics follow `SqlStore` exactly, down to the errors: a duplicate id raises `StoreError`
  (the SQL unique constraint), the idempotency mismatch raises `Conflict`, fenced writes check
  `lease_token` and `status == leased`. The contract suite runs on both to keep it that way.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from backfill.domain.ids import new_key_id, new_project_id
from backfill.domain.ordering import Candidate, order_candidates
from backfill.domain.records import (
    BatchRecord,
    FileRecord,
    Project,
    Segment,
    Shard,
    ShardStatus,
    Usage,
)
from backfill.domain.statuses import TERMINAL, BatchStatus
from backfill.domain.usage import segment_usage
from backfill.errors import Conflict, StoreError
from backfill.store.base import ApiKey, Page
from backfill.store.memory_peaks import MemoryPeaksMixin
from backfill.store.memory_projects import MemoryProjectsMixin
from backfill.store.memory_usage import MemoryUsageMixin
from backfill.store.memory_webhooks import MemoryWebhooksMixin
from backfill.store.rules import (
    IDEMPOTENCY_CONFLICT,
    KEY_CONFLICT,
    check_batch_fields,
    check_transition,
)


@dataclass(slots=True)
class _StoredKey:
    id: str
    project_id: str
    prefix: str | None
    source: str
    created_at: int
    revoked_at: int | None = None
    admin: bool = False


@dataclass(slots=True)
class _StoredBatch:
    seq: int
    record: BatchRecord
    idempotency_key: str | None
    request_hash: str | None


class MemoryStore(MemoryWebhooksMixin, MemoryUsageMixin, MemoryProjectsMixin, MemoryPeaksMixin):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._projects: dict[str, Project] = {}  # by name
        self._keys: dict[str, _StoredKey] = {}  # by key hash
        self._files: dict[str, tuple[int, FileRecord]] = {}
        self._batches: dict[str, _StoredBatch] = {}
        self._shards: dict[tuple[str, int], Shard] = {}
        self._segments: dict[tuple[str, int, int], Segment] = {}
        self._claims: dict[str, tuple[str, float]] = {}  # name -> (owner, expires_at)
        self._init_webhooks()
        self._init_usage()
        self._init_projects()
        self._init_peaks()

    def __repr__(self) -> str:
        return "MemoryStore()"

    # -- lifecycle ---------------------------------------------------------------------------
    def migrate(self) -> None:
        pass

    def close(self) -> None:
        pass

    # -- projects and keys -------------------------------------------------------------------
    def ensure_project(self, name: str) -> Project:
        with self._lock:
            project = self._projects.get(name)
            if project is None:
                project = self._projects[name] = Project(new_project_id(), name)
            return project

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
        with self._lock:
            key = self._keys.get(key_hash)
            if key is None:
                self._keys[key_hash] = _StoredKey(
                    new_key_id(), project_id, prefix, source, now, admin=admin
                )
                return
            if key.project_id != project_id:
                raise Conflict(KEY_CONFLICT)
            if source == "flag":
                key.source, key.revoked_at = "flag", None
                key.prefix = key.prefix or prefix

    def project_for_key(self, key_hash: str) -> Project | None:
        with self._lock:
            key = self._keys.get(key_hash)
            if key is None or key.revoked_at is not None:
                return None
            found = next((p for p in self._projects.values() if p.id == key.project_id), None)
            return None if found is None else replace(found, key_id=key.id, admin=key.admin)

    # -- files -------------------------------------------------------------------------------
    def insert_file(self, file: FileRecord) -> None:
        with self._lock:
            if file.id in self._files:
                raise StoreError(f"metadata store failed: duplicate file id {file.id}")
            self._files[file.id] = (next(self._seq), file)

    def get_file(self, file_id: str, project_id: str | None = None) -> FileRecord | None:
        with self._lock:
            return self._file(file_id, project_id)

    def _file(self, file_id: str, project_id: str | None) -> FileRecord | None:
        entry = self._files.get(file_id)
        if entry is None or (project_id is not None and entry[1].project_id != project_id):
            return None
        return entry[1]

    def list_files(
        self,
        project_id: str,
        *,
        purpose: str | None = None,
        order: str = "desc",
        after: str | None = None,
        limit: int = 10000,
    ) -> Page[FileRecord]:
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be 'asc' or 'desc', not {order!r}")
        with self._lock:
            rows = sorted(
                (seq, f)
                for seq, f in self._files.values()
                if f.project_id == project_id and (purpose is None or f.purpose == purpose)
            )
            if after is not None:
                entry = self._files.get(after)
                if entry is None or entry[1].project_id != project_id:
                    return Page([], False)
                cut = entry[0]
                rows = [r for r in rows if (r[0] > cut if order == "asc" else r[0] < cut)]
        if order == "desc":
            rows.reverse()
        return Page([f for _, f in rows[:limit]], len(rows) > limit)

    def delete_file(self, file_id: str, project_id: str | None = None) -> FileRecord | None:
        with self._lock:
            file = self._file(file_id, project_id)
            if file is not None:
                del self._files[file_id]
            return file

    def expired_files(self, now: int, limit: int) -> list[FileRecord]:
        with self._lock:
            expired = sorted(
                (f.expires_at, seq, f)
                for seq, f in self._files.values()
                if f.expires_at is not None and f.expires_at <= now
            )
        return [f for _, _, f in expired[:limit]]

    def file_in_use(self, file_id: str) -> bool:
        with self._lock:
            return any(
                b.record.input_file_id == file_id and b.record.status not in TERMINAL
                for b in self._batches.values()
            )

    # -- batches -----------------------------------------------------------------------------
    def insert_batch(
        self,
        batch: BatchRecord,
        *,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
    ) -> BatchRecord:
        with self._lock:
            if idempotency_key is not None:
                for stored in self._batches.values():
                    if (
                        stored.record.project_id == batch.project_id
                        and stored.idempotency_key == idempotency_key
                    ):
                        if stored.request_hash != request_hash:
                            raise Conflict(IDEMPOTENCY_CONFLICT, param="Idempotency-Key")
                        return _out(stored.record)
            if batch.id in self._batches:
                raise StoreError(f"metadata store failed: duplicate batch id {batch.id}")
            self._check_active_batches(batch.project_id)
            record = _in(batch)
            self._batches[batch.id] = _StoredBatch(
                next(self._seq), record, idempotency_key, request_hash
            )
            return _out(record)

    def get_batch(self, batch_id: str, project_id: str | None = None) -> BatchRecord | None:
        with self._lock:
            stored = self._batches.get(batch_id)
            if stored is None or project_id not in (None, stored.record.project_id):
                return None
            return _out(stored.record)

    def list_batches(
        self, project_id: str, *, after: str | None = None, limit: int = 20
    ) -> Page[BatchRecord]:
        with self._lock:
            rows = sorted(
                (b for b in self._batches.values() if b.record.project_id == project_id),
                key=lambda b: b.seq,
                reverse=True,
            )
            if after is not None:
                cursor = self._batches.get(after)
                if cursor is None or cursor.record.project_id != project_id:
                    return Page([], False)
                rows = [b for b in rows if b.seq < cursor.seq]
            return Page([_out(b.record) for b in rows[:limit]], len(rows) > limit)

    def batches_in(self, statuses: Iterable[BatchStatus], limit: int = 100) -> list[BatchRecord]:
        wanted = {BatchStatus(s) for s in statuses}
        with self._lock:
            rows = sorted(
                (b for b in self._batches.values() if b.record.status in wanted),
                key=lambda b: b.seq,
            )
            return [_out(b.record) for b in rows[:limit]]

    def transition(
        self,
        batch_id: str,
        from_statuses: Iterable[BatchStatus],
        to_status: BatchStatus,
        **fields: Any,
    ) -> BatchRecord | None:
        changes = check_batch_fields(fields)
        sources, target = check_transition(from_statuses, to_status)
        changes["status"] = target
        return self._update(batch_id, sources, changes)

    def update_batch(
        self, batch_id: str, expect_statuses: Iterable[BatchStatus], **fields: Any
    ) -> BatchRecord | None:
        return self._update(batch_id, expect_statuses, check_batch_fields(fields))

    def _update(
        self, batch_id: str, statuses: Iterable[BatchStatus], changes: dict[str, Any]
    ) -> BatchRecord | None:
        wanted = {BatchStatus(s) for s in statuses}
        with self._lock:
            stored = self._batches.get(batch_id)
            if stored is None or stored.record.status not in wanted:
                return None
            stored.record = replace(stored.record, **changes)
            if changes.get("status") in TERMINAL:
                self._enqueue_batch_event(stored.record, time.time())  # the outbox
            return _out(stored.record)

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
        if any(s.batch_id != batch_id for s in shards):
            raise ValueError("every shard must belong to the batch being started")
        with self._lock:
            stored = self._batches.get(batch_id)
            if enqueued_tokens is not None and stored is not None:
                self._check_token_limit(stored.record.project_id, batch_id, model, enqueued_tokens)
            if stored is None or stored.record.status != BatchStatus.VALIDATING:
                return None
            keys = [(batch_id, s.index) for s in shards]
            if len(set(keys)) != len(keys) or any(k in self._shards for k in keys):
                raise StoreError(f"metadata store failed: duplicate shard of {batch_id}")
            for s in shards:
                self._shards[(batch_id, s.index)] = replace(
                    s,
                    status=ShardStatus.PENDING,
                    lease_owner=None,
                    lease_token=None,
                    lease_expires_at=None,
                    done=0,
                )
            stored.record = replace(
                stored.record,
                status=BatchStatus.IN_PROGRESS,
                in_progress_at=now,
                model=model,
                total=total,
            )
            if enqueued_tokens is not None:
                self._enqueued[batch_id] = enqueued_tokens
            return _out(stored.record)

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
        skip = frozenset(skip_models or ())
        with self._lock:
            names = {p.id: p.name for p in self._projects.values()}
            free_by_batch: dict[str, list[Shard]] = {}
            live: dict[str, int] = {}
            for shard in self._shards.values():
                stored = self._batches.get(shard.batch_id)
                if stored is None:
                    continue
                project = names.get(stored.record.project_id, stored.record.project_id)
                if shard.status == ShardStatus.LEASED and (
                    shard.lease_expires_at is not None and shard.lease_expires_at >= now
                ):
                    live[project] = live.get(project, 0) + 1
                    continue
                if stored.record.status != BatchStatus.IN_PROGRESS or stored.record.stop_reason:
                    continue
                if stored.record.model is not None and stored.record.model in skip:
                    continue
                if shard.status in (ShardStatus.PENDING, ShardStatus.LEASED):
                    free_by_batch.setdefault(shard.batch_id, []).append(shard)
            candidates = []
            for batch_id in free_by_batch:
                stored = self._batches[batch_id]
                r = stored.record
                candidates.append(
                    Candidate(
                        batch_id,
                        names.get(r.project_id, r.project_id),
                        stored.seq,
                        r.expires_at,
                        r.total,
                        r.completed + r.failed,
                        r.in_progress_at,
                    )
                )
            ordered = order_candidates(candidates, live, weights, now)
            if not ordered:
                return None
            pick = min(free_by_batch[ordered[0].batch_id], key=lambda sh: sh.index)
            leased = replace(
                pick,
                status=ShardStatus.LEASED,
                lease_owner=owner,
                lease_token=token,
                lease_expires_at=now + lease_seconds,
            )
            self._shards[(pick.batch_id, pick.index)] = leased
            return leased

    def reopen_shards(self, batch_id: str, indexes: Iterable[int]) -> int:
        with self._lock:
            n = 0
            for index in set(indexes):
                shard = self._shards.get((batch_id, index))
                if shard is not None and shard.status == ShardStatus.DONE:
                    self._shards[(batch_id, index)] = replace(shard, status=ShardStatus.PENDING)
                    n += 1
            return n

    def revoke_leases(self, batch_id: str) -> int:
        with self._lock:
            n = 0
            for key, shard in self._shards.items():
                if shard.batch_id == batch_id and shard.status == ShardStatus.LEASED:
                    self._shards[key] = replace(
                        shard,
                        status=ShardStatus.PENDING,
                        lease_owner=None,
                        lease_token=None,
                        lease_expires_at=None,
                    )
                    n += 1
            return n

    # -- duty claims -------------------------------------------------------------------------
    def claim(self, name: str, owner: str, now: float, seconds: float) -> bool:
        with self._lock:
            held = self._claims.get(name)
            if held is not None and held[0] != owner and held[1] >= now:
                return False
            self._claims[name] = (owner, now + seconds)
            return True

    def release_claim(self, name: str, owner: str) -> None:
        with self._lock:
            held = self._claims.get(name)
            if held is not None and held[0] == owner:
                del self._claims[name]

    def _held(self, batch_id: str, index: int, token: str) -> Shard | None:
        shard = self._shards.get((batch_id, index))
        if shard is None or shard.status != ShardStatus.LEASED or shard.lease_token != token:
            return None
        return shard

    def renew_lease(
        self, batch_id: str, index: int, token: str, now: float, lease_seconds: float
    ) -> bool:
        with self._lock:
            shard = self._held(batch_id, index, token)
            if shard is None:
                return False
            self._shards[(batch_id, index)] = replace(shard, lease_expires_at=now + lease_seconds)
            return True

    def record_segment(self, segment: Segment, token: str) -> bool:
        with self._lock:
            shard = self._held(segment.batch_id, segment.shard_index, token)
            if shard is None:
                return False
            key = (segment.batch_id, segment.shard_index, segment.seq)
            if key in self._segments:
                if self._segments[key].blob_path == segment.blob_path:
                    # a retried checkpoint whose first write did land, with its ledger entry
                    return True
                raise StoreError(f"metadata store failed: duplicate segment {key}")
            self._segments[key] = segment
            self._shards[(segment.batch_id, segment.shard_index)] = replace(
                shard, done=shard.done + segment.completed + segment.failed
            )
            stored = self._batches.get(segment.batch_id)
            if stored is not None:
                r = stored.record
                cost = segment.cost
                stored.record = replace(
                    r,
                    completed=r.completed + segment.completed,
                    failed=r.failed + segment.failed,
                    usage=r.usage + segment.usage,
                    cost=r.cost if cost is None else cost if r.cost is None else r.cost + cost,
                )
                # the segment's ledger entry, once (its key is new: checked above)
                self._insert_usage(
                    segment_usage(segment, r.project_id, r.api_key_id, r.model, r.endpoint)
                )
            return True

    def finish_shard(self, batch_id: str, index: int, token: str) -> bool:
        return self._end_lease(batch_id, index, token, ShardStatus.DONE)

    def release_shard(self, batch_id: str, index: int, token: str) -> bool:
        return self._end_lease(batch_id, index, token, ShardStatus.PENDING)

    def _end_lease(self, batch_id: str, index: int, token: str, status: ShardStatus) -> bool:
        with self._lock:
            shard = self._held(batch_id, index, token)
            if shard is None:
                return False
            self._shards[(batch_id, index)] = replace(
                shard, status=status, lease_owner=None, lease_token=None, lease_expires_at=None
            )
            return True

    def shards(self, batch_id: str) -> list[Shard]:
        with self._lock:
            return sorted(
                (s for s in self._shards.values() if s.batch_id == batch_id),
                key=lambda s: s.index,
            )

    def segments(self, batch_id: str, index: int | None = None) -> list[Segment]:
        with self._lock:
            return [
                self._segments[k]
                for k in sorted(self._segments)
                if k[0] == batch_id and (index is None or k[1] == index)
            ]

    def usage_of(self, batch_id: str) -> Usage:
        total = Usage()
        for segment in self.segments(batch_id):
            total = total + segment.usage
        return total

    # -- keys: listing and revocation ---------------------------------------------------------
    def _api_key(self, key: _StoredKey) -> ApiKey:
        name = next((p.name for p in self._projects.values() if p.id == key.project_id), "")
        return ApiKey(
            key.id,
            key.project_id,
            name,
            key.prefix,
            key.source,
            key.created_at,
            key.revoked_at,
            admin=key.admin,
        )

    def list_api_keys(self, project: str | None = None) -> list[ApiKey]:
        with self._lock:
            keys = [self._api_key(k) for k in self._keys.values()]
        keys = [k for k in keys if project is None or k.project == project]
        return sorted(keys, key=lambda k: (k.created_at, k.id))

    def revoke_api_key(self, key_id: str, now: int) -> ApiKey | None:
        with self._lock:
            key = next((k for k in self._keys.values() if k.id == key_id), None)
            if key is None:
                return None
            if key.revoked_at is None:
                key.revoked_at = now
            return self._api_key(key)

    def revoke_flag_keys(self, keep: Collection[str], now: int) -> list[ApiKey]:
        kept = set(keep)
        with self._lock:
            revoked = []
            for key_hash, key in self._keys.items():
                if key.source == "flag" and key.revoked_at is None and key_hash not in kept:
                    key.revoked_at = now
                    revoked.append(self._api_key(key))
            return sorted(revoked, key=lambda k: (k.created_at, k.id))

    # -- debris of finished batches -----------------------------------------------------------
    def terminal_batches_with_segments(self, limit: int) -> list[str]:
        with self._lock:
            owning = {k[0] for k in self._segments} | {k[0] for k in self._shards}
            found = sorted(
                (b for b in self._batches.values() if b.record.status in TERMINAL),
                key=lambda b: b.seq,
            )
            return [b.record.id for b in found if b.record.id in owning][:limit]

    def delete_segments(self, batch_id: str) -> int:
        with self._lock:
            stored = self._batches.get(batch_id)
            if stored is None or stored.record.status not in TERMINAL:
                return 0
            segments = [k for k in self._segments if k[0] == batch_id]
            shards = [k for k in self._shards if k[0] == batch_id]
            for seg_key in segments:
                del self._segments[seg_key]
            for shard_key in shards:
                del self._shards[shard_key]
            return len(segments) + len(shards)


def _in(batch: BatchRecord) -> BatchRecord:
    """Normalize a record on its way in, as the SQL columns would."""
    return replace(batch, status=BatchStatus(batch.status), **check_batch_fields(_copyable(batch)))


def _copyable(batch: BatchRecord) -> dict[str, Any]:
    return {"metadata": batch.metadata, "errors": batch.errors}


def _out(batch: BatchRecord) -> BatchRecord:
    if batch.metadata is None:
        return batch
    return replace(batch, metadata=dict(batch.metadata))
