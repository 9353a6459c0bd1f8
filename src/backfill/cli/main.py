"""`backfill` command line entry point (argparse: no extra dependency)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from backfill.domain.ids import new_api_key
from backfill.errors import BackfillError
from backfill.settings import Settings, build_settings


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backfill", description="Self-hosted OpenAI-compatible Batch API."
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
    create.add_argument("--config", type=Path)
    create.add_argument("--data-dir", type=Path)
    create.add_argument("--database")

    sim = sub.add_parser("sim", help="run a simulated vLLM server (no GPU needed)")
    from backfill.sim.options import add_arguments

    add_arguments(sim)
    return parser


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    return build_settings(
        config_file=getattr(args, "config", None),
        model_specs=getattr(args, "model", None),
        data_dir=getattr(args, "data_dir", None),
        database=getattr(args, "database", None),
        storage=getattr(args, "storage", None),
        **extra,
    )


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from backfill.service import Service

    settings = _settings(
        args,
        host=args.host,
        port=args.port,
        run_worker=False if args.no_worker else None,
    )
    if args.api_key:
        settings.api_keys = [*settings.api_keys, *args.api_key]
    service = Service(settings)
    app = service.api_app()
    print(
        f"backfill serving on http://{settings.host}:{settings.port}/v1 "
        f"(data: {settings.data_dir}, models: {', '.join(service.served) or 'none'})",
        flush=True,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=args.log_level.lower() if args.log_level.lower() != "info" else "warning",
        access_log=False,
        loop="auto",
        http="auto",
        lifespan="on",
        timeout_graceful_shutdown=5,
        # keep idle client connections longer than clients' own pools do (httpx 5 s, aiohttp
        # 15 s): with uvicorn's 5 s, a client reusing a connection just as the server closes it
        # gets a reset, which real-time streams under load showed (bench/harvest.py)
        timeout_keep_alive=75,
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
    from backfill.engines.registry import default_models

    settings = _settings(args)
    if not settings.models and settings.default_model:
        settings.models = default_models()
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

    settings = _settings(args)
    settings.models = []
    service = Service(settings)
    key = new_api_key()
    service.add_key(key, args.project)
    service.close()
    print(f"Created an API key for project {args.project}: {key}")
    return 0


def _sim(args: argparse.Namespace) -> int:
    from backfill.sim.server import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
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
            return _keys_create(args)
        if args.command == "sim":
            return _sim(args)
    except BackfillError as exc:
        print(f"backfill: {exc.message}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
