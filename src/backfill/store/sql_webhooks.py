"""The webhook side of the SQL store: endpoints and the outbox (`domain/webhooks.py`).

- `enqueue_batch_event` runs inside the transaction that moves a batch into a terminal status
  (`SqlStore._update_batch`), so the event's deliveries commit with the status or not at all.
  A batch enters a terminal status once (terminal statuses have no way out, and the
  conditional UPDATE has one winner), and `(event_id, endpoint_id)` is unique besides.
- Claiming is `SELECT ... FOR UPDATE SKIP LOCKED` (ignored by SQLite, where `BEGIN IMMEDIATE`
  serializes writers) plus a guarded UPDATE that re-checks the row is still due; the claim moves
  `next_attempt_at` past the attempt (a lease) and sets a token that fences the outcome.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Connection, RowMapping, and_, case, func, insert, or_, select, update
from sqlalchemy import delete as sql_delete

from backfill.domain.statuses import BatchStatus
from backfill.domain.webhooks import (
    DELIVERY_STATES,
    EVENT_OF_STATUS,
    WebhookDelivery,
    WebhookEndpoint,
    new_event_id,
)
from backfill.store.schema import projects, webhook_deliveries, webhook_endpoints

T = TypeVar("T")

_TERMINAL_TIME = {
    BatchStatus.COMPLETED: "completed_at",
    BatchStatus.FAILED: "failed_at",
    BatchStatus.EXPIRED: "expired_at",
    BatchStatus.CANCELLED: "cancelled_at",
}


def enqueue_batch_event(conn: Connection, batch: RowMapping, now: float) -> int:
    """Write the deliveries of the event `batch`'s (terminal) status sends; return how many."""
    status = BatchStatus(batch["status"])
    event_type = EVENT_OF_STATUS.get(status)
    if event_type is None:
        return 0
    e = webhook_endpoints
    targets = [
        row.id
        for row in conn.execute(
            select(e.c.id, e.c.event_types).where(
                e.c.project_id == batch["project_id"], e.c.removed_at.is_(None)
            )
        )
        if event_type in row.event_types.split(",")
    ]
    if not targets:
        return 0
    at = batch[_TERMINAL_TIME[status]]
    created_at = int(at if at is not None else now)  # due at once: on the caller's clock
    event_id = new_event_id()
    conn.execute(
        insert(webhook_deliveries),
        [
            {
                "event_id": event_id,
                "event_type": event_type,
                "batch_id": batch["id"],
                "project_id": batch["project_id"],
                "endpoint_id": endpoint_id,
                "created_at": created_at,
                "attempts": 0,
                "next_attempt_at": float(created_at),
            }
            for endpoint_id in targets
        ],
    )
    return len(targets)


def _endpoint(row: RowMapping) -> WebhookEndpoint:
    return WebhookEndpoint(
        id=row["id"],
        project_id=row["project_id"],
        url=row["url"],
        secret=row["secret"],
        event_types=tuple(row["event_types"].split(",")),
        created_at=int(row["created_at"]),
        name=row["name"],
        source=row["source"],
        removed_at=None if row["removed_at"] is None else int(row["removed_at"]),
        project=row.get("project_name") or "",
        updated_at=int(row["updated_at"]),
        previous_secret=row["previous_secret"],
        previous_secret_until=row["previous_secret_until"],
    )


def _delivery(row: RowMapping, url: str = "", secrets: tuple[str, ...] = ()) -> WebhookDelivery:
    return WebhookDelivery(
        id=int(row["seq"]),
        event_id=row["event_id"],
        event_type=row["event_type"],
        batch_id=row["batch_id"],
        project_id=row["project_id"],
        endpoint_id=row["endpoint_id"],
        created_at=int(row["created_at"]),
        attempts=int(row["attempts"]),
        next_attempt_at=float(row["next_attempt_at"] or 0.0),
        delivered_at=None if row["delivered_at"] is None else int(row["delivered_at"]),
        gave_up_at=None if row["gave_up_at"] is None else int(row["gave_up_at"]),
        last_status=row["last_status"],
        last_error=row["last_error"],
        url=url,
        secrets=secrets,
    )


def _endpoint_changes(changes: dict[str, Any]) -> dict[str, Any]:
    """Column values for `update_webhook_endpoint`'s changes (None: unchanged)."""
    allowed = {"url", "name", "event_types", "secret", "previous_secret", "previous_secret_until"}
    unknown = set(changes) - allowed
    if unknown:
        raise ValueError(f"not endpoint fields: {sorted(unknown)}")
    values = {k: v for k, v in changes.items() if v is not None}
    if "event_types" in values:
        values["event_types"] = ",".join(values["event_types"])
    return values


class SqlWebhooksMixin:
    def _run(self, work: Callable[[Connection], T], *, write: bool = True) -> T:
        raise NotImplementedError

    def add_webhook_endpoint(self, endpoint: WebhookEndpoint) -> None:
        values = {
            "id": endpoint.id,
            "project_id": endpoint.project_id,
            "name": endpoint.name,
            "url": endpoint.url,
            "secret": endpoint.secret,
            "event_types": ",".join(endpoint.event_types),
            "source": endpoint.source,
            "created_at": endpoint.created_at,
            "updated_at": endpoint.updated_at or endpoint.created_at,
            "removed_at": endpoint.removed_at,
            "previous_secret": endpoint.previous_secret,
            "previous_secret_until": endpoint.previous_secret_until,
        }
        self._run(lambda conn: conn.execute(insert(webhook_endpoints).values(**values)))

    def _endpoints_query(self) -> Any:
        e = webhook_endpoints
        return (
            select(e, projects.c.name.label("project_name"))
            .outerjoin(projects, projects.c.id == e.c.project_id)
            .where(e.c.removed_at.is_(None))
        )

    def webhook_endpoints(self, project_id: str | None = None) -> list[WebhookEndpoint]:
        q = self._endpoints_query().order_by(webhook_endpoints.c.seq)
        if project_id is not None:
            q = q.where(webhook_endpoints.c.project_id == project_id)
        return self._run(
            lambda conn: [_endpoint(r) for r in conn.execute(q).mappings()], write=False
        )

    def get_webhook_endpoint(
        self, endpoint_id: str, project_id: str | None = None
    ) -> WebhookEndpoint | None:
        q = self._endpoints_query().where(webhook_endpoints.c.id == endpoint_id)
        if project_id is not None:
            q = q.where(webhook_endpoints.c.project_id == project_id)

        def work(conn: Connection) -> WebhookEndpoint | None:
            row = conn.execute(q).mappings().first()
            return None if row is None else _endpoint(row)

        return self._run(work, write=False)

    def remove_webhook_endpoint(
        self, endpoint_id: str, now: int, project_id: str | None = None
    ) -> WebhookEndpoint | None:
        e = webhook_endpoints
        where = and_(e.c.id == endpoint_id, e.c.removed_at.is_(None))
        if project_id is not None:
            where = and_(where, e.c.project_id == project_id)

        def work(conn: Connection) -> WebhookEndpoint | None:
            if conn.execute(update(e).where(where).values(removed_at=now)).rowcount != 1:
                return None
            row = conn.execute(select(e).where(e.c.id == endpoint_id)).mappings().one()
            return _endpoint(row)

        return self._run(work)

    def update_webhook_endpoint(
        self,
        endpoint_id: str,
        now: int,
        project_id: str | None = None,
        **changes: Any,
    ) -> WebhookEndpoint | None:
        e = webhook_endpoints
        where = and_(e.c.id == endpoint_id, e.c.removed_at.is_(None))
        if project_id is not None:
            where = and_(where, e.c.project_id == project_id)
        values = _endpoint_changes(changes)

        def work(conn: Connection) -> WebhookEndpoint | None:
            if values:
                values["updated_at"] = now
                if conn.execute(update(e).where(where).values(**values)).rowcount != 1:
                    return None
            row = conn.execute(self._endpoints_query().where(where)).mappings().first()
            return None if row is None else _endpoint(row)

        return self._run(work)

    def claim_webhook_deliveries(
        self, token: str, now: float, lease_seconds: float, limit: int
    ) -> list[WebhookDelivery]:
        d, e = webhook_deliveries, webhook_endpoints
        due = and_(d.c.next_attempt_at.is_not(None), d.c.next_attempt_at <= now)
        pick = (
            select(d.c.seq)
            .where(due)
            .order_by(d.c.next_attempt_at, d.c.seq)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )

        def work(conn: Connection) -> list[WebhookDelivery]:
            seqs = list(conn.execute(pick).scalars())
            if not seqs:
                return []
            rows = conn.execute(
                select(
                    d,
                    e.c.url,
                    e.c.secret,
                    e.c.previous_secret,
                    e.c.previous_secret_until,
                    e.c.removed_at.label("endpoint_removed_at"),
                )
                .outerjoin(e, e.c.id == d.c.endpoint_id)
                .where(d.c.seq.in_(seqs), due)
                .order_by(d.c.next_attempt_at, d.c.seq)
            ).mappings()
            taken: list[WebhookDelivery] = []
            for row in list(rows):
                guard = and_(d.c.seq == row["seq"], due)
                if row["url"] is None or row["endpoint_removed_at"] is not None:
                    conn.execute(
                        update(d)
                        .where(guard)
                        .values(
                            next_attempt_at=None,
                            gave_up_at=int(now),
                            lease_token=None,
                            last_error="endpoint removed",
                        )
                    )
                    continue
                claimed = conn.execute(
                    update(d)
                    .where(guard)
                    .values(
                        attempts=d.c.attempts + 1,
                        next_attempt_at=now + lease_seconds,
                        lease_token=token,
                    )
                ).rowcount
                if claimed == 1:
                    fresh = conn.execute(select(d).where(d.c.seq == row["seq"])).mappings().one()
                    secrets = [row["secret"]]
                    if row["previous_secret"] and (row["previous_secret_until"] or 0) > now:
                        secrets.append(row["previous_secret"])
                    taken.append(_delivery(fresh, row["url"], tuple(secrets)))
            return taken

        return self._run(work)

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
        d = webhook_deliveries
        values: dict[str, Any] = {"last_status": status, "last_error": error}
        if delivered:
            values.update(delivered_at=int(now), next_attempt_at=None, lease_token=None)
        elif retry_at is None:
            values.update(gave_up_at=int(now), next_attempt_at=None, lease_token=None)
        else:
            values.update(next_attempt_at=retry_at, lease_token=None)
        where = and_(
            d.c.seq == delivery_id,
            d.c.lease_token == token,
            d.c.delivered_at.is_(None),
            d.c.gave_up_at.is_(None),
        )
        return self._run(
            lambda conn: conn.execute(update(d).where(where).values(**values)).rowcount == 1
        )

    def webhook_deliveries(
        self,
        *,
        endpoint_id: str | None = None,
        batch_id: str | None = None,
        with_error: bool = False,
        limit: int = 100,
    ) -> list[WebhookDelivery]:
        d = webhook_deliveries
        q = select(d).order_by(d.c.seq.desc()).limit(limit)
        if endpoint_id is not None:
            q = q.where(d.c.endpoint_id == endpoint_id)
        if batch_id is not None:
            q = q.where(d.c.batch_id == batch_id)
        if with_error:
            q = q.where(d.c.last_error.is_not(None), d.c.last_error != "")
        return self._run(
            lambda conn: [_delivery(r) for r in conn.execute(q).mappings()], write=False
        )

    def webhook_delivery_counts(self, endpoint_id: str) -> dict[str, int]:
        d = webhook_deliveries
        # `WebhookDelivery.state` in SQL: delivered, else failed (given up), else pending.
        state = case(
            (d.c.delivered_at.is_not(None), "delivered"),
            (d.c.gave_up_at.is_not(None), "failed"),
            else_="pending",
        ).label("state")
        q = (
            select(state, func.count().label("n"))
            .where(d.c.endpoint_id == endpoint_id)
            .group_by(state)
        )

        def work(conn: Connection) -> dict[str, int]:
            counts = dict.fromkeys(DELIVERY_STATES, 0)
            counts.update((r.state, int(r.n)) for r in conn.execute(q))
            return counts

        return self._run(work, write=False)

    def prune_webhook_deliveries(self, before: int) -> int:
        d = webhook_deliveries
        ended = or_(d.c.delivered_at.is_not(None), d.c.gave_up_at.is_not(None))
        q = sql_delete(d).where(ended, d.c.created_at < before)
        return self._run(lambda conn: int(conn.execute(q).rowcount))
