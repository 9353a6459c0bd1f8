"""The work side of the SQL store: leasing shards, fenced checkpoints, duty claims.

Split from `sql.py` (which keeps projects, keys, files and batches) so each module holds one
concern. The mixin relies on `SqlStore._run` (one short transaction, exceptions translated to
`StoreError`) and `SqlStore._postgres`.

- Leasing tries batches in the order of `backfill.domain.ordering` (at-risk first, fair shares
  between projects, earliest deadline), then takes the batch's lowest free shard with
  `SELECT ... FOR UPDATE SKIP LOCKED` (ignored by SQLite, where `BEGIN IMMEDIATE` serializes
  writers) and a guarded UPDATE that re-checks the shard is still free. A worker names the
  models it has no room for (`skip_models`): their batches are left for others.
- Fenced writes name the lease token in their WHERE clause; rowcount 0 means the lease is gone
  and nothing was written.
- Claims are rows `(name, owner, expires_at)`: taken by a guarded UPDATE (expired or ours) or
  an `INSERT .. ON CONFLICT DO NOTHING` (RETURNING tells whether it inserted: rowcount is not
  reliable for it on every driver).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, TypeVar

from sqlalchemy import Connection, Select, and_, func, insert, or_, select, update
from sqlalchemy import delete as sql_delete

from backfill.domain.ordering import Candidate, order_candidates
from backfill.domain.records import Segment, Shard, ShardStatus, Usage
from backfill.domain.statuses import BatchStatus
from backfill.domain.usage import segment_usage
from backfill.store.rows import USAGE_COLUMNS, segment_record, shard_record
from backfill.store.schema import batches, claims, projects, segments
from backfill.store.schema import shards as _shards_table  # `shards` is also a method name
from backfill.store.sql_usage import insert_usage

T = TypeVar("T")


class SqlWorkMixin:
    _postgres: bool

    def _run(self, work: Callable[[Connection], T], *, write: bool = True) -> T:
        raise NotImplementedError

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
        s = _shards_table
        free = or_(
            s.c.status == ShardStatus.PENDING,
            and_(s.c.status == ShardStatus.LEASED, s.c.lease_expires_at < now),
        )
        has_free = select(s.c.idx).where(s.c.batch_id == batches.c.id, free).exists()
        candidates_q = (
            select(
                batches.c.id,
                projects.c.name,
                batches.c.seq,
                batches.c.expires_at,
                batches.c.total,
                batches.c.completed,
                batches.c.failed,
                batches.c.in_progress_at,
            )
            .join(projects, projects.c.id == batches.c.project_id)
            .where(
                batches.c.status == BatchStatus.IN_PROGRESS.value,
                batches.c.stop_reason.is_(None),
                has_free,
            )
        )
        if skip_models:
            candidates_q = candidates_q.where(
                or_(batches.c.model.is_(None), batches.c.model.not_in(sorted(set(skip_models))))
            )
        leases_q = (
            select(projects.c.name, func.count())
            .select_from(s.join(batches, batches.c.id == s.c.batch_id))
            .join(projects, projects.c.id == batches.c.project_id)
            .where(s.c.status == ShardStatus.LEASED, s.c.lease_expires_at >= now)
            .group_by(projects.c.name)
        )
        expires = now + lease_seconds

        def work(conn: Connection) -> Shard | None:
            found = [
                Candidate(
                    r[0],
                    r[1],
                    int(r[2]),
                    int(r[3]),
                    int(r[4]),
                    int(r[5]) + int(r[6]),
                    None if r[7] is None else int(r[7]),
                )
                for r in conn.execute(candidates_q)
            ]
            if not found:
                return None
            live = {name: int(n) for name, n in conn.execute(leases_q)}
            for cand in order_candidates(found, live, weights, now):
                pick: Select[Any] = (
                    select(s.c.batch_id, s.c.idx)
                    .where(s.c.batch_id == cand.batch_id, free)
                    .order_by(s.c.idx)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                )
                for _ in range(3):
                    picked = conn.execute(pick).first()
                    if picked is None:
                        break
                    key = _shard_key(picked.batch_id, picked.idx)
                    # The guard re-checks freedom: on PostgreSQL a row can change between the
                    # snapshot and the lock; then we pick again.
                    result = conn.execute(
                        update(s)
                        .where(key, free)
                        .values(
                            status=ShardStatus.LEASED,
                            lease_owner=owner,
                            lease_token=token,
                            lease_expires_at=expires,
                        )
                    )
                    if result.rowcount == 1:
                        row = conn.execute(select(s).where(key)).mappings().one()
                        return shard_record(row)
            return None

        return self._run(work)

    def reopen_shards(self, batch_id: str, indexes: Iterable[int]) -> int:
        s = _shards_table
        wanted = sorted(set(indexes))
        if not wanted:
            return 0
        statement = (
            update(s)
            .where(s.c.batch_id == batch_id, s.c.idx.in_(wanted), s.c.status == ShardStatus.DONE)
            .values(**_ended(ShardStatus.PENDING))
        )
        return int(self._run(lambda conn: conn.execute(statement).rowcount))

    def revoke_leases(self, batch_id: str) -> int:
        s = _shards_table
        statement = (
            update(s)
            .where(s.c.batch_id == batch_id, s.c.status == ShardStatus.LEASED)
            .values(**_ended(ShardStatus.PENDING))
        )
        return int(self._run(lambda conn: conn.execute(statement).rowcount))

    # -- duty claims -------------------------------------------------------------------------
    def claim(self, name: str, owner: str, now: float, seconds: float) -> bool:
        take = (
            update(claims)
            .where(
                claims.c.name == name,
                or_(claims.c.expires_at < now, claims.c.owner == owner),
            )
            .values(owner=owner, expires_at=now + seconds)
        )
        create: Any
        if self._postgres:
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            create = pg_insert(claims).on_conflict_do_nothing(index_elements=["name"])
        else:
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            create = sqlite_insert(claims).on_conflict_do_nothing(index_elements=["name"])
        create = create.values(name=name, owner=owner, expires_at=now + seconds).returning(
            claims.c.name
        )

        def work(conn: Connection) -> bool:
            if conn.execute(take).rowcount == 1:
                return True
            # rowcount is not reliable for INSERT .. ON CONFLICT on every driver: RETURNING is.
            return conn.execute(create).first() is not None

        return self._run(work)

    def release_claim(self, name: str, owner: str) -> None:
        statement = sql_delete(claims).where(claims.c.name == name, claims.c.owner == owner)
        self._run(lambda conn: conn.execute(statement))

    def renew_lease(
        self, batch_id: str, index: int, token: str, now: float, lease_seconds: float
    ) -> bool:
        return self._fenced(batch_id, index, token, {"lease_expires_at": now + lease_seconds})

    def record_segment(self, segment: Segment, token: str) -> bool:
        fence = _fence(segment.batch_id, segment.shard_index, token)
        n = segment.completed + segment.failed
        u = segment.usage
        cost = segment.cost

        def work(conn: Connection) -> bool:
            landed = conn.execute(
                select(segments.c.blob_path).where(
                    segments.c.batch_id == segment.batch_id,
                    segments.c.shard_index == segment.shard_index,
                    segments.c.seq == segment.seq,
                )
            ).scalar_one_or_none()
            if landed is not None and landed == segment.blob_path:
                # a retried checkpoint whose first commit landed but was not acknowledged: its
                # counts, usage and ledger entry landed with it; nothing is written again
                return conn.execute(select(_shards_table.c.idx).where(fence)).first() is not None
            shard_update = update(_shards_table).where(fence).values(done=_shards_table.c.done + n)
            if conn.execute(shard_update).rowcount != 1:
                return False
            conn.execute(
                insert(segments).values(
                    batch_id=segment.batch_id,
                    shard_index=segment.shard_index,
                    seq=segment.seq,
                    blob_path=segment.blob_path,
                    completed=segment.completed,
                    failed=segment.failed,
                    input_tokens=u.input_tokens,
                    cached_tokens=u.cached_tokens,
                    output_tokens=u.output_tokens,
                    reasoning_tokens=u.reasoning_tokens,
                    owner=segment.owner,
                    engine_ms=segment.engine_ms,
                )
            )
            added: dict[str, Any] = {
                "completed": batches.c.completed + segment.completed,
                "failed": batches.c.failed + segment.failed,
                "input_tokens": batches.c.input_tokens + u.input_tokens,
                "cached_tokens": batches.c.cached_tokens + u.cached_tokens,
                "output_tokens": batches.c.output_tokens + u.output_tokens,
                "reasoning_tokens": batches.c.reasoning_tokens + u.reasoning_tokens,
            }
            if cost is not None:
                added["cost_micros"] = batches.c.cost_micros + cost.billed_micros
                added["list_micros"] = batches.c.list_micros + cost.list_micros
                added["currency"] = cost.currency
            batch = conn.execute(
                update(batches)
                .where(batches.c.id == segment.batch_id)
                .values(**added)
                .returning(
                    batches.c.project_id,
                    batches.c.api_key_id,
                    batches.c.model,
                    batches.c.endpoint,
                )
            ).first()
            if batch is not None:
                # the segment's ledger entry, once: the segment's key is new (checked above,
                # and its primary key would refuse it), and the entry's ref is unique too
                insert_usage(conn, segment_usage(segment, *batch))
            return True

        return self._run(work)

    def finish_shard(self, batch_id: str, index: int, token: str) -> bool:
        return self._fenced(batch_id, index, token, _ended(ShardStatus.DONE))

    def release_shard(self, batch_id: str, index: int, token: str) -> bool:
        return self._fenced(batch_id, index, token, _ended(ShardStatus.PENDING))

    def _fenced(self, batch_id: str, index: int, token: str, values: dict[str, Any]) -> bool:
        statement = update(_shards_table).where(_fence(batch_id, index, token)).values(**values)
        return self._run(lambda conn: conn.execute(statement).rowcount == 1)

    def shards(self, batch_id: str) -> list[Shard]:
        query = (
            select(_shards_table)
            .where(_shards_table.c.batch_id == batch_id)
            .order_by(_shards_table.c.idx)
        )
        rows = self._run(lambda conn: conn.execute(query).mappings().all(), write=False)
        return [shard_record(r) for r in rows]

    def segments(self, batch_id: str, index: int | None = None) -> list[Segment]:
        query = select(segments).where(segments.c.batch_id == batch_id)
        if index is not None:
            query = query.where(segments.c.shard_index == index)
        query = query.order_by(segments.c.shard_index, segments.c.seq)
        rows = self._run(lambda conn: conn.execute(query).mappings().all(), write=False)
        return [segment_record(r) for r in rows]

    def usage_of(self, batch_id: str) -> Usage:
        query = select(*(func.coalesce(func.sum(segments.c[c]), 0) for c in USAGE_COLUMNS)).where(
            segments.c.batch_id == batch_id
        )
        row = self._run(lambda conn: conn.execute(query).one(), write=False)
        return Usage(*(int(v) for v in row))


def _shard_key(batch_id: str, index: int) -> Any:
    return and_(_shards_table.c.batch_id == batch_id, _shards_table.c.idx == index)


def _fence(batch_id: str, index: int, token: str) -> Any:
    return and_(
        _shard_key(batch_id, index),
        _shards_table.c.lease_token == token,
        _shards_table.c.status == ShardStatus.LEASED,
    )


def _ended(status: str) -> dict[str, Any]:
    return {
        "status": status,
        "lease_owner": None,
        "lease_token": None,
        "lease_expires_at": None,
    }
