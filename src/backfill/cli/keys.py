"""`backfill keys create | list | revoke`: API keys in the store, while a server runs or not.

`create` goes through `Service` (which registers the key's project and digest) given a copy
of the settings without models, so no engine starts (`Service` still adds the packaged model:
built, not started). `create --admin` makes an admin key: it also reads every project's usage
and costs (the `/v1/organization/...` reports). `list` and `revoke` open the store alone: they
need no engines and register no keys. A key is listed by id and prefix, never whole: `create`
prints it once. A revoked key is refused within the API's auth cache time (10 s).
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
from backfill.errors import NotFound

__all__ = ["app"]

app = typer.Typer(help="Manage API keys: create, list, revoke.", no_args_is_help=True)

#: the project of `keys create --admin` without `--project`
ADMIN_PROJECT = "admin"


@app.command("create")
def create(
    ctx: typer.Context,
    project: Annotated[
        str | None,
        typer.Option(
            "--project",
            help="the project the key acts for (required, except with --admin)",
            show_default="with --admin: a project named admin",
        ),
    ] = None,
    admin: Annotated[
        bool,
        typer.Option("--admin", help="an admin key: also reads every project's usage and costs"),
    ] = False,
    config: Config = None,
    data_dir: DataDir = DATA_DIR,
    database: Database = None,
) -> None:
    """Create a key for a project and print it.

    The key is shown this once: the store keeps only its digest and prefix. An admin key
    (`--admin`) acts for its project (`admin` unless `--project` says) and reads every
    project's usage and costs (`/v1/organization/usage/...`, `/v1/organization/costs`).
    """
    from backfill.domain.ids import new_api_key
    from backfill.service import Service

    if project is None and not admin:
        raise typer.BadParameter("Missing option '--project' (or give --admin).")
    name = project or ADMIN_PROJECT
    settings = command_settings(ctx, config, data_dir, database)
    service = Service(settings.model_copy(update={"models": [], "default_model": False}))
    key = new_api_key()
    service.add_key(key, name, admin=admin)
    service.close()
    kind = "an admin API key" if admin else "an API key"
    print(f"Created {kind} for project {name}: {key}")


@app.command("list")
def list_keys(
    ctx: typer.Context,
    project: Annotated[
        str | None, typer.Option("--project", help="only this project's keys", show_default="all")
    ] = None,
    config: Config = None,
    data_dir: DataDir = DATA_DIR,
    database: Database = None,
) -> None:
    """List keys: id, prefix, project, admin, created, source, revoked."""
    store = store_alone(command_settings(ctx, config, data_dir, database))
    try:
        keys = store.list_api_keys(project)
    finally:
        store.close()
    rows = [("ID", "PREFIX", "PROJECT", "ADMIN", "CREATED", "SOURCE", "REVOKED")]
    for k in keys:
        prefix = f"{k.prefix}..." if k.prefix else "-"
        admin = "yes" if k.admin else "-"
        rows.append(
            (k.id, prefix, k.project, admin, when(k.created_at), k.source, when(k.revoked_at))
        )
    print(columns(rows))


@app.command("revoke")
def revoke(
    ctx: typer.Context,
    key_id: Annotated[str, typer.Argument(metavar="KEY_ID", help="a key's id (`keys list`)")],
    config: Config = None,
    data_dir: DataDir = DATA_DIR,
    database: Database = None,
) -> None:
    """Revoke a key by its id (see `keys list`)."""
    store = store_alone(command_settings(ctx, config, data_dir, database))
    try:
        key = store.revoke_api_key(key_id, int(time.time()))
    finally:
        store.close()
    if key is None:
        raise NotFound(f"no API key {key_id!r} (see `backfill keys list`)")
    print(f"Revoked API key {key.id} of project {key.project} at {when(key.revoked_at)}.")
    if key.source == "flag":
        print("It was given at serve start: a server started with it again makes it valid.")
