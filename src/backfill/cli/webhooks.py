"""`backfill webhooks add | list | remove | deliveries | secret`: a project's webhook endpoints
in the store, while a server runs or not (a running server sends to an endpoint from the next
batch that ends; no restart).

`add` prints the endpoint's `whsec_` secret once (receivers check signatures with it, e.g. the
`openai` SDK's `client.webhooks.unwrap`); `list` shows each endpoint with its deliveries by
state and its last error; `deliveries` lists the newest deliveries, attempts and errors, for
finding out why a receiver got nothing. `secret` prints a fresh secret for the config file's
`[[webhooks]]`. Endpoints from the config file are listed with source `config` and are
changed there, not here.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer

from backfill.cli.options import (
    DATA_DIR,
    Config,
    Database,
    DataDir,
    columns,
    command_settings,
    store_alone,
    when,
)
from backfill.domain.webhooks import EVENT_TYPES, new_secret
from backfill.errors import Conflict, NotFound

__all__ = ["app"]

app = typer.Typer(
    help="Webhook endpoints: add, list, remove, deliveries, secret.", no_args_is_help=True
)


@app.command("add")
def add(
    ctx: typer.Context,
    url: Annotated[str, typer.Argument(help="where events are POSTed (http:// or https://)")],
    project: Annotated[str, typer.Option("--project", help="whose batches' events")],
    events: Annotated[
        str,
        typer.Option("--events", help="comma-separated event types"),
    ] = ",".join(EVENT_TYPES),
    name: Annotated[str, typer.Option("--name", help="a name for people")] = "",
    config: Config = None,
    data_dir: DataDir = DATA_DIR,
    database: Database = None,
) -> None:
    """Add an endpoint for a project's batch events and print its signing secret."""
    from backfill.webhooks.endpoints import make_endpoint

    store = store_alone(command_settings(ctx, config, data_dir, database))
    try:
        p = store.ensure_project(project)
        types = [e.strip() for e in events.split(",") if e.strip()]
        endpoint = make_endpoint(p.id, url, int(time.time()), events=types, name=name)
        store.add_webhook_endpoint(endpoint)
    finally:
        store.close()
    print(f"Added webhook endpoint {endpoint.id} for project {project}: {url}")
    print(f"events: {', '.join(endpoint.event_types)}")
    print(f"signing secret (shown once): {endpoint.secret}")


@app.command("list")
def list_endpoints(
    ctx: typer.Context,
    project: Annotated[
        str | None, typer.Option("--project", help="only this project's", show_default="all")
    ] = None,
    config: Config = None,
    data_dir: DataDir = DATA_DIR,
    database: Database = None,
) -> None:
    """List endpoints with their deliveries: delivered / pending / failed, and the last error."""
    store = store_alone(command_settings(ctx, config, data_dir, database))
    try:
        project_id = None
        if project is not None:  # looked up, never made: a listing writes nothing
            found = [p for p, _ in store.projects() if p.name == project]
            if not found:
                raise NotFound(f"no project {project!r} (see `backfill projects list`)")
            project_id = found[0].id
        endpoints = store.webhook_endpoints(project_id)
        # Counted by the store, not loaded; the last error is the newest delivery with one.
        tallies = {e.id: store.webhook_delivery_counts(e.id) for e in endpoints}
        errors = {
            e.id: store.webhook_deliveries(endpoint_id=e.id, with_error=True, limit=1)
            for e in endpoints
        }
    finally:
        store.close()
    rows = [
        ("ID", "PROJECT", "URL", "EVENTS", "SOURCE", "CREATED", "OK/PENDING/FAILED", "LAST ERROR")
    ]
    for e in endpoints:
        n = tallies[e.id]
        last = next((d.last_error for d in errors[e.id] if d.last_error), None) or "-"
        events = "all" if set(e.event_types) == set(EVENT_TYPES) else ",".join(e.event_types)
        counts = f"{n['delivered']}/{n['pending']}/{n['failed']}"
        rows.append(
            (e.id, e.project, e.url, events, e.source, when(e.created_at), counts, last[:80])
        )
    print(columns(rows))


@app.command("remove")
def remove(
    ctx: typer.Context,
    endpoint_id: Annotated[str, typer.Argument(metavar="ENDPOINT_ID", help="`webhooks list`")],
    config: Config = None,
    data_dir: DataDir = DATA_DIR,
    database: Database = None,
) -> None:
    """Remove an endpoint; its pending deliveries end as failed."""
    store = store_alone(command_settings(ctx, config, data_dir, database))
    try:
        found = store.get_webhook_endpoint(endpoint_id)
        if found is not None and found.source == "config":
            raise Conflict(f"{endpoint_id} comes from the config file: remove it there")
        gone = store.remove_webhook_endpoint(endpoint_id, int(time.time()))
    finally:
        store.close()
    if gone is None:
        raise NotFound(f"no webhook endpoint {endpoint_id!r} (see `backfill webhooks list`)")
    print(f"Removed webhook endpoint {gone.id} ({gone.url}).")


@app.command("deliveries")
def deliveries(
    ctx: typer.Context,
    endpoint: Annotated[
        str | None, typer.Option("--endpoint", help="only this endpoint's", show_default="all")
    ] = None,
    batch: Annotated[
        str | None, typer.Option("--batch", help="only this batch's", show_default="all")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="the newest this many")] = 20,
    config: Config = None,
    data_dir: DataDir = DATA_DIR,
    database: Database = None,
) -> None:
    """The newest deliveries: event, batch, state, attempts, next attempt, last answer."""
    store = store_alone(command_settings(ctx, config, data_dir, database))
    try:
        found = store.webhook_deliveries(endpoint_id=endpoint, batch_id=batch, limit=limit)
    finally:
        store.close()
    rows = [("EVENT", "TYPE", "BATCH", "ENDPOINT", "STATE", "ATTEMPTS", "NEXT", "LAST")]
    for d in found:
        nxt = when(int(d.next_attempt_at)) if d.state == "pending" else "-"
        last = d.last_error or (str(d.last_status) if d.last_status else "-")
        rows.append((d.event_id, d.event_type, d.batch_id, d.endpoint_id, d.state,
                     str(d.attempts), nxt, last[:80]))  # fmt: skip
    print(columns(rows))


@app.command("secret")
def secret() -> None:
    """Print a new signing secret (whsec_...) for the config file's [[webhooks]]."""
    print(new_secret())
