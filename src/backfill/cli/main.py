"""`backfill`: one typer application for every command, and `main`, the console script.

    backfill serve | worker | run          cli/server.py  (run batches on this machine)
    backfill keys create | list | revoke   cli/keys.py
    backfill webhooks add | list | remove | deliveries | secret   cli/webhooks.py
    backfill sim                           sim/options.py (a simulated vLLM server)
    backfill submit | retry | batches | files   cli/client.py (any OpenAI-compatible API)

Each module owns a `typer.Typer`; the root adds it with one line: merged (`add_typer(x.app)`:
its commands become top-level) or as a group (`add_typer(x.app, name="keys")`). Importing the
command modules is cheap by rule: what a command runs (uvicorn, the service, engines and
torch, the openai SDK) is imported inside it, so `backfill --help` loads none of it.

Help is click's plain layout (`rich_markup_mode=None`): rich's boxed tables cut long help
and defaults with an ellipsis at 80 columns, the width of a pipe or a log. Exit codes: a
usage error 2 (click's message), a `BackfillError` 2 (`backfill: MESSAGE`), a client
command's failure 1 (`client.failure`), Ctrl-C 130.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from backfill import __version__
from backfill.cli import client, keys, projects, server, usage, webhooks
from backfill.errors import BackfillError
from backfill.sim import options as sim

__all__ = ["app", "main"]

app = typer.Typer(
    name="backfill",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(server.app)  # serve, worker, run
app.add_typer(keys.app, name="keys")
app.add_typer(projects.app, name="projects")
app.add_typer(webhooks.app, name="webhooks")
app.add_typer(usage.app)  # usage
app.add_typer(sim.app)  # sim
app.add_typer(client.app)  # submit, retry, batches, files


def _version(value: bool) -> None:
    if value:
        print(f"backfill {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="print the version"),
    ] = False,
) -> None:
    """Self-hosted OpenAI-compatible Batch API.

    serve, worker, run, keys, projects, usage, webhooks and sim work on this machine. submit,
    retry, batches and files are clients of any OpenAI-compatible API: --base-url and --api-key,
    or OPENAI_BASE_URL and OPENAI_API_KEY. `backfill COMMAND --help` shows a command's options
    and their defaults.
    """


def main(argv: list[str] | None = None) -> int:
    """Run `backfill` with `argv` (default: `sys.argv[1:]`); the exit code."""
    try:
        app(args=sys.argv[1:] if argv is None else argv, prog_name="backfill")
    except SystemExit as exc:  # typer's standalone mode always ends this way
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except BackfillError as exc:
        print(f"backfill: {exc.message}", file=sys.stderr)
        return 2
    except Exception as exc:
        message = client.failure(exc)
        if message is None:
            raise
        client.stderr.print(f"backfill: {message}", highlight=False, markup=False)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
