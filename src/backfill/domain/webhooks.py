"""Webhooks as OpenAI sends them: endpoints, events, deliveries and the retry schedule.

A batch reaching a terminal status is an *event* (`batch.completed`, `batch.failed`,
`batch.expired`, `batch.cancelled`). The store writes one *delivery* row per active endpoint of
the batch's project that wants the event, in the same transaction as the status change (the
outbox), so an event can never be lost between the change and its delivery, and is made only
once (a terminal status has no way out, and the conditional update has one winner).

The event body is OpenAI's: `{"id": "evt_...", "type": "batch.completed", "created_at": T,
"data": {"id": "batch_..."}, "object": "event"}`, with `created_at` the time of the status
change. Every attempt at one delivery carries the event id as its `webhook-id` (Standard
Webhooks), so a receiver that saw it already can drop a repeat: delivery is at least once,
exactly once for a receiver that keeps the ids.

Attempts are retried with exponential backoff (`retry_delay`: 5 s, 10 s, 20 s, ... capped at an
hour by default) until the event is `give_up_after` old (72 hours by default).
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass
from typing import Any

from backfill.domain.ids import _random
from backfill.domain.statuses import BatchStatus

#: the event each terminal status sends
EVENT_OF_STATUS: dict[BatchStatus, str] = {
    BatchStatus.COMPLETED: "batch.completed",
    BatchStatus.FAILED: "batch.failed",
    BatchStatus.EXPIRED: "batch.expired",
    BatchStatus.CANCELLED: "batch.cancelled",
}
EVENT_TYPES: tuple[str, ...] = tuple(EVENT_OF_STATUS.values())

#: `source` of an endpoint: made with `backfill webhooks add` or the API (`cli`), or read from
#: the config file's `[[webhooks]]` (`config`: kept while it is there, removed when it is not)
ENDPOINT_SOURCES = ("cli", "config")


def new_endpoint_id() -> str:
    return "whep_" + _random(24)


def new_event_id() -> str:
    return "evt_" + _random(24)


def new_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def check_secret(secret: str) -> str:
    """`secret` if it is a usable `whsec_` secret, else ValueError saying why."""
    if not secret.startswith("whsec_"):
        raise ValueError("a webhook secret starts with whsec_ (make one: backfill webhooks add)")
    try:
        raw = base64.b64decode(secret[len("whsec_") :], validate=True)
    except ValueError as exc:
        raise ValueError("a webhook secret is whsec_ followed by base64") from exc
    if len(raw) < 24:
        raise ValueError("a webhook secret needs at least 24 random bytes")
    return secret


def secret_hint(secret: str) -> str:
    """What listings show of a secret (OpenAI's `signing_secret_hint`)."""
    return secret[:10] + "..." + secret[-4:]


def check_url(url: str) -> str:
    if not url.startswith(("http://", "https://")) or len(url) > 2048 or " " in url:
        raise ValueError(f"a webhook URL is an http:// or https:// URL, not {url!r}")
    return url


def check_event_types(types: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    unknown = [t for t in types if t not in EVENT_TYPES]
    if unknown or not types:
        raise ValueError(
            f"event types must be some of {', '.join(EVENT_TYPES)}"
            + (f"; not {', '.join(unknown)}" if unknown else "")
        )
    return tuple(dict.fromkeys(types))


@dataclass(frozen=True, slots=True)
class WebhookEndpoint:
    id: str
    project_id: str
    url: str
    secret: str
    event_types: tuple[str, ...]
    created_at: int
    name: str = ""
    source: str = "cli"  # ENDPOINT_SOURCES
    removed_at: int | None = None
    project: str = ""  # the project's name, where the store joined it
    updated_at: int | None = None  # None: never changed since created
    #: after a rotation that keeps the old secret for a while, it signs too until then
    previous_secret: str | None = None
    previous_secret_until: int | None = None

    def secrets_at(self, now: float) -> tuple[str, ...]:
        """The secrets an attempt at `now` is signed with (each gives one signature)."""
        if self.previous_secret and (self.previous_secret_until or 0) > now:
            return (self.secret, self.previous_secret)
        return (self.secret,)

    def wants(self, event_type: str) -> bool:
        return self.removed_at is None and event_type in self.event_types

    def to_dict(self, *, with_secret: bool = False) -> dict[str, Any]:
        """OpenAI's `webhook_endpoint` object (with `signing_secret` only when made)."""
        out: dict[str, Any] = {
            "id": self.id,
            "object": "webhook_endpoint",
            "name": self.name,
            "url": self.url,
            "event_types": list(self.event_types),
            "created_at": self.created_at,
            "updated_at": self.updated_at or self.created_at,
            "signing_secret_hint": secret_hint(self.secret),
        }
        if with_secret:
            out["signing_secret"] = self.secret
        return out


#: `WebhookDelivery.state`s, in the order `backfill webhooks list` shows their counts
DELIVERY_STATES = ("delivered", "pending", "failed")


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    """One event for one endpoint, as the outbox holds it."""

    id: int  # the outbox row
    event_id: str  # also the `webhook-id` of every attempt
    event_type: str
    batch_id: str
    project_id: str
    endpoint_id: str
    created_at: int  # the event's time: the status change
    attempts: int = 0  # attempts started so far
    next_attempt_at: float = 0.0
    delivered_at: int | None = None
    gave_up_at: int | None = None
    last_status: int | None = None  # the receiver's last HTTP status (None: no answer)
    last_error: str | None = None
    url: str = ""  # the endpoint's, joined when claimed
    secrets: tuple[str, ...] = ()  # what signs the attempt (`WebhookEndpoint.secrets_at`)

    @property
    def state(self) -> str:
        if self.delivered_at is not None:
            return "delivered"
        if self.gave_up_at is not None:
            return "failed"
        return "pending"

    def body(self) -> dict[str, Any]:
        return {
            "id": self.event_id,
            "object": "event",
            "type": self.event_type,
            "created_at": self.created_at,
            "data": {"id": self.batch_id},
        }


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    first_delay: float = 5.0
    max_delay: float = 3600.0
    give_up_after: float = 72 * 3600.0

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the `attempts`-th failed attempt (1, 2, ...): doubling from
        `first_delay`, capped at `max_delay`."""
        return float(min(self.max_delay, self.first_delay * 2 ** max(0, min(attempts - 1, 40))))

    def next_attempt(self, created_at: float, attempts: int, now: float) -> float | None:
        """When to try again after a failed attempt, or None: the event is too old, give up."""
        at = now + self.delay(attempts)
        return None if at > created_at + self.give_up_after else at
