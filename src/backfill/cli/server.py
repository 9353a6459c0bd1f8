"""`backfill serve | worker | run`: the commands that run batches on this machine.

Thin: options in, `Settings` built once (`options.settings_from`), one call out. What they
run is imported inside each command (uvicorn and the service for `serve`, the service for
`worker`, `cli/run.py` and the engines for `run`), so `backfill --help` and the client
commands load none of it. `serve` configures uvicorn with `api/protocol.py` (our header
limits, deadlines and connection cap) and `fit_connections` (raises RLIMIT_NOFILE).
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Annotated

import typer

from backfill.cli.options import (
    DATA_DIR,
    HOST,
    MODEL_SPEC,
    PORT,
    Config,
    Database,
    DataDir,
    LogLevel,
    Models,
    Storage,
    configure_logging,
    settings_from,
)

__all__ = ["app"]

app = typer.Typer()


@app.command()
def serve(
    ctx: typer.Context,
    config: Config = None,
    data_dir: DataDir = DATA_DIR,
    database: Database = None,
    storage: Storage = None,
    model: Models = None,
    log_level: LogLevel = "info",
    host: Annotated[str, typer.Option("--host", help="address to listen on")] = HOST,
    port: Annotated[int, typer.Option("--port", help="port to listen on")] = PORT,
    api_key: Annotated[
        list[str] | None,
        typer.Option(
            "--api-key", metavar="KEY", help="register KEY for project 'default' (repeatable)"
        ),
    ] = None,
    no_worker: Annotated[
        bool, typer.Option("--no-worker", help="run the API only (workers run elsewhere)")
    ] = False,
) -> None:
    """Run the API, with the scheduler and a worker.

    Options override the --config file, which overrides BACKFILL_* variables; the defaults
    shown are the built-in ones.
    """
    import uvicorn

    from backfill.api.protocol import HttpLimits, fit_connections, protocol_class
    from backfill.service import Service

    configure_logging(log_level)
    settings = settings_from(
        ctx,
        config,
        model,
        api_key,
        data_dir=data_dir,
        database=database,
        storage=storage,
        host=host,
        port=port,
    )
    if no_worker:
        settings = settings.model_copy(update={"run_worker": False})
    service = Service(settings)
    api = service.api_app()
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
    level = log_level.lower()
    server_config = uvicorn.Config(
        api,
        host=settings.host,
        port=settings.port,
        log_level=level if level != "info" else "warning",
        access_log=False,
        loop="auto",
        # httptools with our header limits, header deadline and connection cap (api/protocol.py)
        http=protocol_class(limits),
        ws="none",  # no WebSocket routes: an upgrade request is answered as plain HTTP
        lifespan="on",
        timeout_graceful_shutdown=5,
        timeout_keep_alive=settings.http_keep_alive_seconds,
    )
    uvicorn.Server(server_config).run()


@app.command()
def worker(
    ctx: typer.Context,
    config: Config = None,
    data_dir: DataDir = DATA_DIR,
    database: Database = None,
    storage: Storage = None,
    model: Models = None,
    log_level: LogLevel = "info",
) -> None:
    """Run the scheduler and a worker, without the API.

    Options override the --config file, which overrides BACKFILL_* variables; the defaults
    shown are the built-in ones.
    """
    from backfill.service import Service

    configure_logging(log_level)
    service = Service(
        settings_from(ctx, config, model, data_dir=data_dir, database=database, storage=storage)
    )

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


@app.command()
def run(
    ctx: typer.Context,
    input_path: Annotated[Path, typer.Argument(metavar="INPUT", help="batch input file (JSONL)")],
    output: Annotated[Path, typer.Option("-o", "--output", help="output file (JSONL)")],
    errors: Annotated[
        Path | None,
        typer.Option(
            "--errors", help="error file (JSONL)", show_default="OUTPUT with .errors.jsonl"
        ),
    ] = None,
    config: Config = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            metavar=f"{MODEL_SPEC} | NAME=transformers:PATH | NAME=embeddings:PATH",
            help="route model NAME (repeatable)",
            show_default="none given: the packaged all-MiniLM-L6-v2 and SmolLM2-135M-Instruct",
        ),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency",
            min=1,
            help="requests in flight",
            show_default="the model's max_concurrency",
        ),
    ] = None,
    no_progress: Annotated[
        bool, typer.Option("--no-progress", help="no progress on stderr")
    ] = False,
    log_level: LogLevel = "warning",
) -> None:
    """Run one batch file offline, with no server (resumable).

    Output and error lines are appended in completion order; a rerun skips the custom_ids
    already written. Exit 2 for an invalid file, 130 when interrupted.
    """
    from backfill.cli.run import main as run_main  # the service, the engines
    from backfill.engines.registry import with_default_models

    configure_logging(log_level)
    settings = with_default_models(settings_from(ctx, config, model))
    code = run_main(
        settings, input_path, output, errors, progress=not no_progress, concurrency=concurrency
    )
    if code:
        raise typer.Exit(code)
