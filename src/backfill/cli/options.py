"""Options the server commands share (serve, worker, run, keys...), settings built from them,
the store opened alone, and the tables the commands print.

Settings come from `BACKFILL_*` variables < the `--config` file < options (`settings.py`).
`--help` shows each option's default: a field of `Settings` shows the field's default, read
from the class, so help and code cannot drift apart. That shown value is also the parameter's
default, but it must not beat the environment or the config file, so `given` passes on only
the options typed on the command line. Defaults that depend on something else (the database
in the data dir, the model's concurrency) are described in words instead.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from backfill.settings import Settings, build_settings

if TYPE_CHECKING:
    from backfill.store.base import Store

__all__ = [
    "DATA_DIR",
    "HOST",
    "PORT",
    "Config",
    "DataDir",
    "Database",
    "LogLevel",
    "Models",
    "Storage",
    "columns",
    "command_settings",
    "configure_logging",
    "given",
    "settings_from",
    "store_alone",
    "when",
]

DATA_DIR: Path = Settings.model_fields["data_dir"].default
HOST: str = Settings.model_fields["host"].default
PORT: int = Settings.model_fields["port"].default

#: what `--model` adds up to when no model is configured (`engines/registry.default_models`)
DEFAULT_MODELS = "none given: the packaged all-MiniLM-L6-v2 and SmolLM2-135M-Instruct"
MODEL_SPEC = "NAME=URL[#UPSTREAM]"

Config = Annotated[
    Path | None,
    typer.Option("--config", help="TOML config file (over BACKFILL_* variables)"),
]
DataDir = Annotated[Path, typer.Option("--data-dir", help="folder for the database and blobs")]
Database = Annotated[
    str | None,
    typer.Option(
        "--database",
        help="database URL (sqlite:///PATH, postgresql://...)",
        show_default="SQLite in the data dir",
    ),
]
Storage = Annotated[
    str | None,
    typer.Option(
        "--storage",
        help="blob storage URL (file://, s3://, ...)",
        show_default="a folder in the data dir",
    ),
]
Models = Annotated[
    list[str] | None,
    typer.Option(
        "--model",
        metavar=MODEL_SPEC,
        help="serve model NAME from the OpenAI-compatible upstream at URL, or in this process "
        "with NAME=transformers:PATH or NAME=embeddings:PATH (repeatable)",
        show_default=DEFAULT_MODELS,
    ),
]
LogLevel = Annotated[str, typer.Option("--log-level", help="debug, info, warning or error")]


def given(ctx: typer.Context, **values: Any) -> dict[str, Any]:
    """The `values` whose options were typed on the command line (the rest stay unset, so that
    the environment and the config file decide them)."""
    typed = {}
    for name, value in values.items():
        source = ctx.get_parameter_source(name)
        if source is not None and source.name == "COMMANDLINE":
            typed[name] = value
    return typed


def settings_from(
    ctx: typer.Context,
    config: Path | None,
    models: list[str] | None = None,
    api_keys: list[str] | None = None,
    **options: Any,
) -> Settings:
    """Settings: environment < `config` < the `options` typed (see `given`)."""
    return build_settings(
        config_file=config,
        model_specs=models,
        extra_api_keys=api_keys,
        **given(ctx, **options),
    )


def command_settings(
    ctx: typer.Context, config: Path | None, data_dir: Path, database: str | None
) -> Settings:
    """The settings of a command that works on the store alone (keys, projects, usage,
    webhooks): logging configured, environment < `config` < the options typed."""
    configure_logging()
    return settings_from(ctx, config, data_dir=data_dir, database=database)


def store_alone(settings: Settings) -> Store:
    """The store alone, migrated: those commands need no engines and register no keys."""
    from backfill.store import open_store

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(settings.database_url, busy_timeout=settings.store_busy_timeout)
    store.migrate()
    return store


def when(ts: int | None) -> str:
    """A Unix time as the commands print it (UTC), `-` for none."""
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def columns(rows: Sequence[Sequence[str]]) -> str:
    """Rows as left-aligned columns two spaces apart (the first row is the header)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def configure_logging(level: str = "info") -> None:
    """Log lines on stderr at `level` (an unknown level is info); alembic's only when warnings."""
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
