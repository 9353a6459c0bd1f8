"""Making and syncing webhook endpoints: what `backfill webhooks add`, the API and the config
file's `[[webhooks]]` share.

Config endpoints (source `config`) are kept while the file lists them: at start, each listed
one that is not in the store as it is (project, URL, secret, events) is added and every config
endpoint the file no longer lists is removed, the way keys given at start are kept only while
given. Endpoints made with the CLI or the API (source `cli`) are never touched by this.
"""

from __future__ import annotations

import logging

from backfill.domain.webhooks import (
    EVENT_TYPES,
    WebhookEndpoint,
    check_event_types,
    check_secret,
    check_url,
    new_endpoint_id,
    new_secret,
)
from backfill.errors import InvalidRequest
from backfill.settings import WebhookConfig
from backfill.store.base import Store

log = logging.getLogger("backfill.webhooks")


def make_endpoint(
    project_id: str,
    url: str,
    now: int,
    *,
    events: list[str] | tuple[str, ...] = EVENT_TYPES,
    secret: str | None = None,
    name: str = "",
    source: str = "cli",
) -> WebhookEndpoint:
    """A new endpoint, checked (`InvalidRequest` says what is wrong), with a fresh secret unless
    one is given."""
    try:
        return WebhookEndpoint(
            id=new_endpoint_id(),
            project_id=project_id,
            url=check_url(url),
            secret=check_secret(secret) if secret is not None else new_secret(),
            event_types=check_event_types(list(events)),
            created_at=now,
            name=name,
            source=source,
        )
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from exc


def sync_config_endpoints(store: Store, configured: list[WebhookConfig], now: int) -> None:
    # every entry checked before anything is written: a bad one refuses the start and leaves
    # the store as it was (no endpoint removed, no project made)
    checked: list[tuple[WebhookConfig, tuple[str, ...]]] = []
    for c in configured:
        try:
            check_url(c.url)
            check_secret(c.secret)
            checked.append((c, check_event_types(c.events)))
        except ValueError as exc:
            raise InvalidRequest(f"[[webhooks]] {c.url}: {exc}") from exc
    wanted: dict[tuple[str, str, str, tuple[str, ...]], WebhookConfig] = {}
    for c, events in checked:
        wanted[(store.ensure_project(c.project).id, c.url, c.secret, events)] = c
    have = {
        (e.project_id, e.url, e.secret, e.event_types): e
        for e in store.webhook_endpoints()
        if e.source == "config"
    }
    for key, endpoint in have.items():
        if key not in wanted:
            store.remove_webhook_endpoint(endpoint.id, now)
            log.info("removed webhook endpoint %s (%s): no longer in the config", endpoint.id,
                     endpoint.url)  # fmt: skip
    for key, c in wanted.items():
        if key not in have:
            endpoint = make_endpoint(
                key[0], c.url, now, events=key[3], secret=c.secret, name=c.name, source="config"
            )
            store.add_webhook_endpoint(endpoint)
            log.info("webhook endpoint %s for %s from the config", endpoint.id, c.url)
