"""The webhook side of `MemoryStore`: endpoints and the outbox, the twin of `sql_webhooks.py`.

The mixin keeps its own dicts under the store's one lock; `_enqueue_batch_event` is called by
`MemoryStore._update` while it holds the lock, as the SQL store writes the outbox inside the
transaction of the status change.
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from dataclasses import replace
from typing import Any

from backfill.domain.records import BatchRecord, Project
from backfill.domain.webhooks import (
    DELIVERY_STATES,
    EVENT_OF_STATUS,
    WebhookDelivery,
    WebhookEndpoint,
    new_event_id,
)


class MemoryWebhooksMixin:
    _lock: threading.Lock
    _projects: dict[str, Project]

    def _init_webhooks(self) -> None:
        self._endpoints: dict[str, WebhookEndpoint] = {}  # insertion order is age
        self._deliveries: dict[int, WebhookDelivery] = {}
        self._delivery_tokens: dict[int, str | None] = {}
        self._delivery_seq = itertools.count(1)

    def _enqueue_batch_event(self, batch: BatchRecord, now: float) -> int:
        event_type = EVENT_OF_STATUS.get(batch.status)
        if event_type is None:
            return 0
        targets = [
            e
            for e in self._endpoints.values()
            if e.project_id == batch.project_id and e.wants(event_type)
        ]
        at = {
            "batch.completed": batch.completed_at,
            "batch.failed": batch.failed_at,
            "batch.expired": batch.expired_at,
            "batch.cancelled": batch.cancelled_at,
        }[event_type]
        created_at = int(at if at is not None else now)  # due at once: on the caller's clock
        event_id = new_event_id()
        for endpoint in targets:
            seq = next(self._delivery_seq)
            self._deliveries[seq] = WebhookDelivery(
                id=seq,
                event_id=event_id,
                event_type=event_type,
                batch_id=batch.id,
                project_id=batch.project_id,
                endpoint_id=endpoint.id,
                created_at=created_at,
                next_attempt_at=float(created_at),
            )
            self._delivery_tokens[seq] = None
        return len(targets)

    def _named(self, endpoint: WebhookEndpoint) -> WebhookEndpoint:
        name = next((p.name for p in self._projects.values() if p.id == endpoint.project_id), "")
        return replace(endpoint, project=name)

    def add_webhook_endpoint(self, endpoint: WebhookEndpoint) -> None:
        from backfill.errors import StoreError

        with self._lock:
            if endpoint.id in self._endpoints:
                raise StoreError(f"metadata store failed: duplicate endpoint id {endpoint.id}")
            self._endpoints[endpoint.id] = replace(
                endpoint, project="", updated_at=endpoint.updated_at or endpoint.created_at
            )

    def webhook_endpoints(self, project_id: str | None = None) -> list[WebhookEndpoint]:
        with self._lock:
            return [
                self._named(e)
                for e in self._endpoints.values()
                if e.removed_at is None and project_id in (None, e.project_id)
            ]

    def get_webhook_endpoint(
        self, endpoint_id: str, project_id: str | None = None
    ) -> WebhookEndpoint | None:
        with self._lock:
            e = self._endpoints.get(endpoint_id)
            if e is None or e.removed_at is not None or project_id not in (None, e.project_id):
                return None
            return self._named(e)

    def remove_webhook_endpoint(
        self, endpoint_id: str, now: int, project_id: str | None = None
    ) -> WebhookEndpoint | None:
        with self._lock:
            e = self._endpoints.get(endpoint_id)
            if e is None or e.removed_at is not None or project_id not in (None, e.project_id):
                return None
            e = self._endpoints[endpoint_id] = replace(e, removed_at=now)
            return e

    def update_webhook_endpoint(
        self,
        endpoint_id: str,
        now: int,
        project_id: str | None = None,
        **changes: Any,
    ) -> WebhookEndpoint | None:
        from backfill.store.sql_webhooks import _endpoint_changes  # the same checks

        values = _endpoint_changes(changes)
        if "event_types" in values:
            values["event_types"] = tuple(values["event_types"].split(","))
        with self._lock:
            e = self._endpoints.get(endpoint_id)
            if e is None or e.removed_at is not None or project_id not in (None, e.project_id):
                return None
            if values:
                e = self._endpoints[endpoint_id] = replace(e, updated_at=now, **values)
            return self._named(e)

    def claim_webhook_deliveries(
        self, token: str, now: float, lease_seconds: float, limit: int
    ) -> list[WebhookDelivery]:
        with self._lock:
            due = sorted(
                (d for d in self._deliveries.values() if d.state == "pending") if limit > 0 else (),
                key=lambda d: (d.next_attempt_at, d.id),
            )
            taken: list[WebhookDelivery] = []
            for d in due:
                if d.next_attempt_at > now or len(taken) >= limit:
                    break
                endpoint = self._endpoints.get(d.endpoint_id)
                if endpoint is None or endpoint.removed_at is not None:
                    self._deliveries[d.id] = replace(
                        d, gave_up_at=int(now), last_error="endpoint removed"
                    )
                    self._delivery_tokens[d.id] = None
                    continue
                d = self._deliveries[d.id] = replace(
                    d, attempts=d.attempts + 1, next_attempt_at=now + lease_seconds
                )
                self._delivery_tokens[d.id] = token
                taken.append(replace(d, url=endpoint.url, secrets=endpoint.secrets_at(now)))
            return taken

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
        with self._lock:
            d = self._deliveries.get(delivery_id)
            if d is None or d.state != "pending" or self._delivery_tokens.get(d.id) != token:
                return False
            changes: dict[str, Any] = {"last_status": status, "last_error": error}
            if delivered:
                changes["delivered_at"] = int(now)
            elif retry_at is None:
                changes["gave_up_at"] = int(now)
            else:
                changes["next_attempt_at"] = retry_at
            self._deliveries[d.id] = replace(d, **changes)
            self._delivery_tokens[d.id] = None
            return True

    def webhook_deliveries(
        self,
        *,
        endpoint_id: str | None = None,
        batch_id: str | None = None,
        with_error: bool = False,
        limit: int = 100,
    ) -> list[WebhookDelivery]:
        with self._lock:
            found = [
                d
                for d in reversed(self._deliveries.values())
                if endpoint_id in (None, d.endpoint_id)
                and batch_id in (None, d.batch_id)
                and (d.last_error or not with_error)
            ]
            return found[:limit]

    def webhook_delivery_counts(self, endpoint_id: str) -> dict[str, int]:
        with self._lock:
            n = Counter(d.state for d in self._deliveries.values() if d.endpoint_id == endpoint_id)
        return {state: n[state] for state in DELIVERY_STATES}

    def prune_webhook_deliveries(self, before: int) -> int:
        with self._lock:
            gone = [
                k
                for k, d in self._deliveries.items()
                if d.state != "pending" and d.created_at < before
            ]
            for k in gone:
                del self._deliveries[k]
                self._delivery_tokens.pop(k, None)
            return len(gone)
