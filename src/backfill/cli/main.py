"""`backfill` command line entry point.

The server commands (serve, worker, run, keys, sim) are on argparse; the client commands
(submit, batches, files, retry) and `--version` are on typer in `cli/client.py`, which `main`
hands its argv to.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from backfill.domain.ids import new_api_key
from backfill.errors import BackfillError, NotFound
from backfill.settings import Settings, build_settings
from backfill.store.base import Store


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML config file")
    p.add_argument("--data-dir", type=Path, help="folder for the database and blobs")
    p.add_argument("--database", help="database URL (default: SQLite in the data dir)")
    p.add_argument("--storage", help="blob storage URL (default: a folder in the data dir)")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=URL[#UPSTREAM]",
        help="serve model NAME from the OpenAI-compatible upstream at URL, or in this process "
        "with NAME=transformers:PATH or NAME=embeddings:PATH (repeatable)",
    )
    p.add_argument("--log-level", default="info")


# the client commands, in `cli/client.py` (kept here so the server commands need not import it)
_CLIENT_COMMANDS = frozenset({"submit", "batches", "files", "retry"})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backfill",
        description="Self-hosted OpenAI-compatible Batch API.",
        epilog="client commands (any OpenAI-compatible API; `backfill COMMAND --help`): "
        "submit, batches list|get|cancel|results|watch, files upload|list|get|download|delete, "
        "retry; --version",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the API (with scheduler and worker)")
    _common(serve)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument(
        "--api-key", action="append", default=[], help="register KEY for project 'default'"
    )
    serve.add_argument("--no-worker", action="store_true", help="run the API only")

    worker = sub.add_parser("worker", help="run a worker and scheduler without the API")
    _common(worker)

    run = sub.add_parser("run", help="run one batch file offline, with no server (resumable)")
    run.add_argument("input", type=Path, help="batch input file (JSONL)")
    run.add_argument("-o", "--output", type=Path, required=True, help="output file (JSONL)")
    run.add_argument("--errors", type=Path, help="error file (default: OUTPUT with .errors.jsonl)")
    run.add_argument("--config", type=Path, help="TOML config file")
    run.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=URL[#UPSTREAM] | NAME=transformers:PATH | NAME=embeddings:PATH",
        help="route model NAME (repeatable); default: the packaged all-MiniLM-L6-v2",
    )
    run.add_argument("--concurrency", type=int, help="requests in flight (default: the model's)")
    run.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    run.add_argument("--log-level", default="warning")

    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key for a project and print it")
    create.add_argument("--project", required=True)
    listing = keys_sub.add_parser("list", help="list keys: id, prefix, project, source, revoked")
    listing.add_argument("--project", help="only this project's keys")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its id (see `keys list`)")
    revoke.add_argument("key_id", metavar="KEY_ID")
    for p in (create, listing, revoke):
        p.add_argument("--config", type=Path)
        p.add_argument("--data-dir", type=Path)
        p.add_argument("--database")

    sim = sub.add_parser("sim", help="run a simulated vLLM server (no GPU needed)")
    from backfill.sim.options import add_arguments

    add_arguments(sim)
    return parser


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    return build_settings(
        config_file=getattr(args, "config", None),
        model_specs=getattr(args, "model", None),
        extra_api_keys=getattr(args, "api_key", None),
        data_dir=getattr(args, "data_dir", None),
        database=getattr(args, "database", None),
        storage=getattr(args, "storage", None),
        **extra,
    )


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from backfill.api.protocol import HttpLimits, fit_connections, protocol_class
    from backfill.service import Service

    settings = _settings(
        args,
        host=args.host,
        port=args.port,
        run_worker=False if args.no_worker else None,
    )
    service = Service(settings)
    app = service.api_app()
    print(
        f"backfill serving on http://{settings.host}:{settings.port}/v1 "
        f"(data: {settings.data_dir}, models: {', '.join(service.served) or 'none'})",
        flush=True,
    )
    limits = HttpLimits(
        max_header_bytes=settings.http_max_header_bytes,
        max_headers=settings.http_max_headers,
        header_timeout=settings.http_header_timeout_seconds,
        body_idle_timeout=settings.http_body_idle_seconds,
        max_connections=fit_connections(settings.http_max_connections),
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=args.log_level.lower() if args.log_level.lower() != "info" else "warning",
        access_log=False,
        loop="auto",
        # httptools with our header limits, header deadline and connection cap (api/protocol.py)
        http=protocol_class(limits),
        ws="none",  # no WebSocket routes: an upgrade request is answered as plain HTTP
        lifespan="on",
        timeout_graceful_shutdown=5,
        timeout_keep_alive=settings.http_keep_alive_seconds,
    )
    uvicorn.Server(config).run()
    return 0


def _worker(args: argparse.Namespace) -> int:
    from backfill.service import Service

    service = Service(_settings(args))

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with service.background():
            print(f"backfill worker running (data: {service.settings.data_dir})", flush=True)
            await stop.wait()

    asyncio.run(main())
    service.close()
    return 0


def _run(args: argparse.Namespace) -> int:
    from backfill.cli.run import main as run_main
    from backfill.engines.registry import with_default_models

    settings = with_default_models(_settings(args))
    return run_main(
        settings,
        args.input,
        args.output,
        args.errors,
        progress=not args.no_progress,
        concurrency=args.concurrency,
    )


def _keys_create(args: argparse.Namespace) -> int:
    from backfill.service import Service

    service = Service(_settings(args).model_copy(update={"models": [], "default_model": False}))
    key = new_api_key()
    service.add_key(key, args.project)
    service.close()
    print(f"Created an API key for project {args.project}: {key}")
    return 0


def _key_store(args: argparse.Namespace) -> Store:
    """The store alone: listing and revoking keys needs no engines and registers no keys."""
    from backfill.store import open_store

    settings = _settings(args)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(settings.database_url, busy_timeout=settings.store_busy_timeout)
    store.migrate()
    return store


def _when(ts: int | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _keys_list(args: argparse.Namespace) -> int:
    store = _key_store(args)
    try:
        keys = store.list_api_keys(args.project)
    finally:
        store.close()
    rows = [("ID", "PREFIX", "PROJECT", "CREATED", "SOURCE", "REVOKED")]
    for k in keys:
        prefix = f"{k.prefix}..." if k.prefix else "-"
        rows.append((k.id, prefix, k.project, _when(k.created_at), k.source, _when(k.revoked_at)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    store = _key_store(args)
    try:
        key = store.revoke_api_key(args.key_id, int(time.time()))
    finally:
        store.close()
    if key is None:
        raise NotFound(f"no API key {args.key_id!r} (see `backfill keys list`)")
    print(f"Revoked API key {key.id} of project {key.project} at {_when(key.revoked_at)}.")
    if key.source == "flag":
        print("It was given at serve start: a server started with it again makes it valid.")
    return 0


def _sim(args: argparse.Namespace) -> int:
    from backfill.sim.server import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and (argv[0] in _CLIENT_COMMANDS or argv[0] == "--version"):
        from backfill.cli.client import run as run_client  # typer, rich, openai: client only

        return run_client(argv)
    args = _parser().parse_args(argv)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO)
        if hasattr(args, "log_level")
        else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "worker":
            return _worker(args)
        if args.command == "run":
            return _run(args)
        if args.command == "keys":
            commands = {"create": _keys_create, "list": _keys_list, "revoke": _keys_revoke}
            return commands[args.keys_command](args)
        if args.command == "sim":
            return _sim(args)
    except BackfillError as exc:
        print(f"backfill: {exc.message}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
