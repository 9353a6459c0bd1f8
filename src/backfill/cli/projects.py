"""`backfill projects create | list | set NAME`: projects and their quotas, in the store.

Like `keys list`, these open the store alone (no engines) and may run while a server does:
the server reads a project's settings where they apply, at most `project_settings_ttl`
seconds old (enqueued-token limits at the end of each validation, the active-batch cap at each
create, weights when workers lease, real-time limits at admission), so a change applies to the
next batch and the next real-time requests without a restart. What each setting means:
`domain/projects.py`.

Numeric options take `none` to clear a value (back to the server's default); `--token-limit
MODEL=N` is repeatable and `MODEL=none` removes that model's limit.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Annotated, Any

import typer

from backfill.cli.options import (
    DATA_DIR,
    Config,
    Database,
    DataDir,
    columns,
    command_settings,
    store_alone,
)
from backfill.domain.projects import ProjectLoad, ProjectSettings

__all__ = ["app"]

app = typer.Typer(help="Manage projects and their quotas: create, list, set.", no_args_is_help=True)

Name = Annotated[str, typer.Argument(metavar="NAME", help="the project's name")]
TokenLimit = Annotated[
    list[str] | None,
    typer.Option(
        "--token-limit",
        metavar="MODEL=N",
        help="enqueued tokens allowed per model over unfinished batches (MODEL=none: no limit)",
    ),
]
MaxActive = Annotated[
    str | None,
    typer.Option("--max-active-batches", metavar="N", help="unfinished batches at once (none)"),
]
Weight = Annotated[
    str | None, typer.Option("--weight", metavar="W", help="fair share of the workers (none)")
]
Rpm = Annotated[
    str | None,
    typer.Option("--realtime-rpm", metavar="N", help="real-time requests per minute (none)"),
]
Tpm = Annotated[
    str | None,
    typer.Option("--realtime-tpm", metavar="N", help="real-time tokens per minute (none)"),
]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"backfill: {message}", err=True)
    return typer.Exit(2)  # as every other refused command


def _number(option: str, value: str, kind: type[int] | type[float]) -> int | float | None:
    if value.strip().lower() == "none":
        return None
    try:
        number = kind(value)
    except ValueError:
        raise _fail(f"{option} takes a number or 'none', not {value!r}") from None
    if number < 0:
        raise _fail(f"{option} cannot be negative")
    return number


def apply_options(
    settings: ProjectSettings,
    token_limit: list[str] | None,
    max_active_batches: str | None,
    weight: str | None,
    realtime_rpm: str | None,
    realtime_tpm: str | None,
) -> ProjectSettings:
    """`settings` with the options given applied (options not given keep their value)."""
    for spec in token_limit or []:
        model, sep, amount = spec.rpartition("=")
        if not sep or not model:
            raise _fail(f"--token-limit takes MODEL=N or MODEL=none, not {spec!r}")
        limit = _number("--token-limit", amount, int)
        settings = settings.with_token_limit(model, None if limit is None else int(limit))
    changes: dict[str, Any] = {}
    for name, option, value, kind in (
        ("max_active_batches", "--max-active-batches", max_active_batches, int),
        ("weight", "--weight", weight, float),
        ("realtime_rpm", "--realtime-rpm", realtime_rpm, float),
        ("realtime_tpm", "--realtime-tpm", realtime_tpm, float),
    ):
        if value is not None:
            changes[name] = _number(option, value, kind)
    if changes.get("weight") == 0:
        raise _fail("--weight must be more than 0 (or 'none')")
    return replace(settings, **changes)


@app.command("create")
def create(
    ctx: typer.Context,
    name: Name,
    token_limit: TokenLimit = None,
    max_active_batches: MaxActive = None,
    weight: Weight = None,
    realtime_rpm: Rpm = None,
    realtime_tpm: Tpm = None,
    config: Config = None,
    data_dir: DataDir = DATA_DIR,
    database: Database = None,
) -> None:
    """Create a project, optionally with its quotas (as `set` takes them)."""
    settings = apply_options(
        ProjectSettings(), token_limit, max_active_batches, weight, realtime_rpm, realtime_tpm
    )
    store = store_alone(command_settings(ctx, config, data_dir, database))
    try:
        if any(p.name == name for p, _ in store.projects()):
            raise _fail(f"project {name!r} already exists (change it with `projects set`)")
        project = store.ensure_project(name)
        store.set_project_settings(name, settings)
    finally:
        store.close()
    print(f"Created project {name} ({project.id})")


@app.command("set")
def set_project(
    ctx: typer.Context,
    name: Name,
    token_limit: TokenLimit = None,
    max_active_batches: MaxActive = None,
    weight: Weight = None,
    realtime_rpm: Rpm = None,
    realtime_tpm: Tpm = None,
    config: Config = None,
    data_dir: DataDir = DATA_DIR,
    database: Database = None,
) -> None:
    """Change a project's quotas; a running server applies them within seconds."""
    store = store_alone(command_settings(ctx, config, data_dir, database))
    try:
        found = {p.name: s for p, s in store.projects()}
        if name not in found:
            raise _fail(f"no project {name!r} (see `projects list`)")
        settings = apply_options(
            found[name], token_limit, max_active_batches, weight, realtime_rpm, realtime_tpm
        )
        store.set_project_settings(name, settings)
    finally:
        store.close()
    print(f"Project {name}: {describe(settings)}")


@app.command("list")
def list_projects(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    config: Config = None,
    data_dir: DataDir = DATA_DIR,
    database: Database = None,
) -> None:
    """Projects with their settings and live figures: unfinished batches, enqueued tokens."""
    store = store_alone(command_settings(ctx, config, data_dir, database))
    try:
        found = [(p, s, store.project_load(p.id)) for p, s in store.projects()]
    finally:
        store.close()
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "id": p.id,
                        "name": p.name,
                        "settings": s.to_json() or {},
                        "active_batches": load.active_batches,
                        "enqueued_tokens": dict(load.enqueued_tokens),
                    }
                    for p, s, load in found
                ],
                indent=2,
            )
        )
        return
    rows = [("PROJECT", "ACTIVE", "WEIGHT", "RT RPM", "RT TPM", "ENQUEUED TOKENS")]
    for p, s, load in found:
        rows.append(
            (
                p.name,
                _of(load.active_batches, s.max_active_batches),
                _g(s.weight),
                _g(s.realtime_rpm),
                _g(s.realtime_tpm),
                tokens_cell(s, load),
            )
        )
    print(columns(rows))


def tokens_cell(settings: ProjectSettings, load: ProjectLoad) -> str:
    """`model=enqueued/limit` for every model with tokens enqueued or a limit."""
    models = sorted(set(settings.token_limits) | set(load.enqueued_tokens))
    cells = [
        f"{m}={_of(load.enqueued_tokens.get(m, 0), settings.token_limits.get(m))}" for m in models
    ]
    return " ".join(cells) or "-"


def describe(settings: ProjectSettings) -> str:
    shown = settings.to_json()
    return json.dumps(shown, sort_keys=True) if shown else "server defaults"


def _of(value: int, limit: int | None) -> str:
    return f"{value:,}" if limit is None else f"{value:,}/{limit:,}"


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"
