"""The client half of `backfill`: any OpenAI-compatible Files + Batches API, through `openai`.

`submit`, `batches list|get|cancel|results|watch`, `files upload|list|get|download|delete` and
`retry`, on typer; `cli/main.py` merges `app` into the one `backfill` app. Each command takes
`--base-url` and `--api-key`, else `OPENAI_BASE_URL` / `OPENAI_API_KEY`. Results go to stdout
(ids, rich tables, or JSON with `--json`); progress and notes go to stderr. A failure (a
`CliError`, an API error, a connection error) is `backfill: MESSAGE` on stderr and exit 1
(`failure`, called by `main`). The openai SDK (most of a second to import) is imported by
the first command that talks to an API, so `backfill --help` and the server commands never
load it.
"""

from __future__ import annotations

import itertools
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

if TYPE_CHECKING:
    from openai import OpenAI
    from openai.types import Batch, FileObject

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})

app = typer.Typer()  # submit, retry, batches, files: merged into the root app by cli/main.py
batches_app = typer.Typer(help="list, inspect, cancel and download batches", no_args_is_help=True)
files_app = typer.Typer(help="upload, list, download and delete files", no_args_is_help=True)
app.add_typer(batches_app, name="batches")
app.add_typer(files_app, name="files")

stderr = Console(stderr=True)

BaseUrl = Annotated[
    str | None,
    typer.Option(
        "--base-url", envvar="OPENAI_BASE_URL", help="API base URL, e.g. http://h:8080/v1"
    ),
]
ApiKey = Annotated[
    str | None,
    typer.Option("--api-key", envvar="OPENAI_API_KEY", help="API key", show_default=False),
]
AsJson = Annotated[bool, typer.Option("--json", help="print JSON (for scripts)")]
Interval = Annotated[float, typer.Option("--interval", min=0.05, help="seconds between polls")]
OutPath = Annotated[
    Path | None,
    typer.Option("-o", "--output", help="output file (default: <batch_id>.output.jsonl)"),
]
ErrPath = Annotated[
    Path | None, typer.Option("--errors", help="error file (default: <batch_id>.errors.jsonl)")
]
Wait = Annotated[bool, typer.Option("--wait", help="follow the batch, then download its results")]


class CliError(Exception):
    """A user-facing failure: printed as `backfill: MESSAGE`, exit 1."""


def _client(base_url: str | None, api_key: str | None) -> OpenAI:
    if not api_key:
        raise CliError("no API key: pass --api-key or set OPENAI_API_KEY")
    from openai import OpenAI  # the SDK only once a command talks to an API

    return OpenAI(base_url=base_url, api_key=api_key, max_retries=3)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _dump(obj: Batch | FileObject) -> dict[str, Any]:
    return obj.model_dump(mode="json")


def _when(timestamp: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


def _counts(batch: Batch) -> tuple[int, int, int]:
    counts = batch.request_counts
    if counts is None:
        return 0, 0, 0
    return counts.completed, counts.failed, counts.total


def _batch_table(batches: list[Batch]) -> Table:
    id_column = Column("ID", no_wrap=True, min_width=30)
    table = Table(id_column, "STATUS", "ENDPOINT", "DONE/FAILED/TOTAL", "CREATED", box=None)
    for batch in batches:
        done, failed, total = _counts(batch)
        row = (batch.id, batch.status, batch.endpoint, f"{done}/{failed}/{total}")
        table.add_row(*row, _when(batch.created_at))
    return table


def _file_table(files: list[FileObject]) -> Table:
    id_column = Column("ID", no_wrap=True, min_width=29)
    table = Table(id_column, "FILENAME", "PURPOSE", "BYTES", "CREATED", box=None)
    for f in files:
        table.add_row(f.id, f.filename, f.purpose, str(f.bytes), _when(f.created_at))
    return table


def _show(table: Table) -> None:
    """Print to stdout; piped, at full width (never a truncated id for grep or awk)."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=1000)
    console.print(table)


def _emit(items: list[Any], as_json: bool, table: Callable[[list[Any]], Table]) -> None:
    """A listing: JSON objects with `--json`, else a table."""
    if as_json:
        _print_json([_dump(x) for x in items])
    else:
        _show(table(items))


def _show_batch(batch: Batch) -> None:
    done, failed, total = _counts(batch)
    rows = [
        ("id", batch.id),
        ("status", batch.status),
        ("endpoint", batch.endpoint),
        ("requests", f"{done} completed, {failed} failed, {total} total"),
        ("input_file_id", batch.input_file_id),
        ("output_file_id", batch.output_file_id or "-"),
        ("error_file_id", batch.error_file_id or "-"),
        ("created", _when(batch.created_at)),
        ("metadata", json.dumps(batch.metadata) if batch.metadata else "-"),
    ]
    if batch.errors and batch.errors.data:
        rows += [("error", f"{e.code}: {e.message}") for e in batch.errors.data]
    table = Table(box=None, show_header=False)
    for key, value in rows:
        table.add_row(key, value)
    _show(table)


def _metadata(pairs: list[str]) -> dict[str, str]:
    metadata: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--metadata wants KEY=VALUE, got {pair!r}")
        metadata[key] = value
    return metadata


def _endpoint_of(path: Path) -> str:
    with path.open("rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    url = json.loads(raw).get("url")
                except (ValueError, AttributeError) as exc:
                    raise CliError(f"{path}: the first line is not a JSON object") from exc
                if not isinstance(url, str) or not url:
                    raise CliError(f"{path}: the first line has no url; pass --endpoint")
                return url
    raise CliError(f"{path} is empty")


def _upload(client: OpenAI, path: Path, filename: str | None = None) -> FileObject:
    with path.open("rb") as f:
        return client.files.create(file=(filename or path.name, f), purpose="batch")


def _download(client: OpenAI, file_id: str, dest: Path) -> None:
    with client.files.with_streaming_response.content(file_id) as resp:
        resp.stream_to_file(dest)


def _follow(client: OpenAI, batch: Batch, interval: float) -> Batch:
    """A live progress bar on stderr until the batch ends; the final batch."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=stderr, transient=False) as progress:
        task = progress.add_task(batch.id, total=None, status=batch.status)
        while True:
            done, failed, total = _counts(batch)
            progress.update(task, completed=done + failed, total=total or None, status=batch.status)
            if batch.status in TERMINAL:
                return batch
            time.sleep(interval)
            batch = client.batches.retrieve(batch.id)


def _results(client: OpenAI, batch: Batch, output: Path | None, errors: Path | None) -> None:
    """Download the batch's output and error files (those it has), noting the paths on stderr."""
    for file_id, given, suffix, kind in (
        (batch.output_file_id, output, "output", "output"),
        (batch.error_file_id, errors, "errors", "errors"),
    ):
        if file_id:
            dest = given or Path(f"{batch.id}.{suffix}.jsonl")
            _download(client, file_id, dest)
            stderr.print(f"{kind}: {dest}", highlight=False)
    if batch.errors and batch.errors.data:
        for e in batch.errors.data:
            line = f" (line {e.line})" if e.line is not None else ""
            stderr.print(f"batch error{line}: {e.code}: {e.message}", highlight=False)


def _finish(
    client: OpenAI,
    batch: Batch,
    *,
    wait: bool,
    as_json: bool,
    output: Path | None,
    errors: Path | None,
    interval: float,
) -> None:
    """After a create: print the id (or JSON), or follow, download and exit by status."""
    if not wait:
        if as_json:
            _print_json(_dump(batch))
        else:
            print(batch.id)
        return
    if not as_json:
        print(batch.id, flush=True)
    try:
        batch = _follow(client, batch, interval)
    except KeyboardInterrupt:
        stderr.print(f"stopped following; the batch goes on: backfill batches watch {batch.id}")
        raise typer.Exit(130) from None
    _results(client, batch, output, errors)
    if as_json:
        _print_json(_dump(batch))
    if batch.status != "completed":
        stderr.print(f"batch {batch.id} ended {batch.status}", highlight=False)
        raise typer.Exit(1)


@app.command()
def submit(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="batch input (JSONL)")],
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    endpoint: Annotated[
        str | None, typer.Option("--endpoint", help="default: the first line's url")
    ] = None,
    completion_window: Annotated[str, typer.Option("--completion-window")] = "24h",
    metadata: Annotated[
        list[str] | None, typer.Option("--metadata", help="KEY=VALUE (repeatable)")
    ] = None,
    wait: Wait = False,
    output: OutPath = None,
    errors: ErrPath = None,
    as_json: AsJson = False,
    interval: Interval = 2.0,
) -> None:
    """Upload FILE and create a batch from it; print its id."""
    client = _client(base_url, api_key)
    endpoint = endpoint or _endpoint_of(file)
    meta = _metadata(metadata or [])
    uploaded = _upload(client, file)
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint=endpoint,  # type: ignore[arg-type]  # any endpoint the server accepts
        completion_window=completion_window,  # type: ignore[arg-type]
        metadata=meta or None,
    )
    _finish(
        client, batch, wait=wait, as_json=as_json, output=output, errors=errors, interval=interval
    )


@app.command(short_help="Retry an ended batch's failed requests as a new batch.")
def retry(
    batch_id: Annotated[str, typer.Argument(help="an ended batch with failed requests")],
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    wait: Wait = False,
    output: OutPath = None,
    errors: ErrPath = None,
    as_json: AsJson = False,
    interval: Interval = 2.0,
) -> None:
    """A new batch of the input lines whose requests failed, with metadata retry_of."""
    client = _client(base_url, api_key)
    batch = client.batches.retrieve(batch_id)
    if batch.status not in TERMINAL:
        raise CliError(f"batch {batch_id} is {batch.status}: retry it once it has ended")
    if not batch.error_file_id:
        stderr.print(f"batch {batch_id} has no failed requests: nothing to retry", highlight=False)
        return
    failed: set[str] = set()
    with client.files.with_streaming_response.content(batch.error_file_id) as resp:
        for line in resp.iter_lines():
            if line.strip():
                custom_id = json.loads(line).get("custom_id")
                if isinstance(custom_id, str):
                    failed.add(custom_id)
    if not failed:
        stderr.print(f"batch {batch_id}'s error file names no request", highlight=False)
        return
    with tempfile.TemporaryDirectory(prefix="backfill-retry-") as tmp:
        path = Path(tmp) / f"retry-{batch_id}.jsonl"
        picked = 0
        with (
            path.open("w", encoding="utf-8") as out,
            client.files.with_streaming_response.content(batch.input_file_id) as resp,
        ):
            for line in resp.iter_lines():
                if line.strip() and json.loads(line).get("custom_id") in failed:
                    out.write(line.rstrip("\r\n") + "\n")
                    picked += 1
        if picked == 0:
            raise CliError(f"none of the failed custom_ids is in {batch.input_file_id}")
        uploaded = _upload(client, path)
    meta = dict(batch.metadata or {})
    meta["retry_of"] = meta.get("retry_of") or batch.id
    new = client.batches.create(
        input_file_id=uploaded.id,
        endpoint=batch.endpoint,  # type: ignore[arg-type]
        completion_window=batch.completion_window,  # type: ignore[arg-type]
        metadata=meta,
    )
    stderr.print(f"retrying {picked} failed requests of {batch_id}", highlight=False)
    _finish(
        client, new, wait=wait, as_json=as_json, output=output, errors=errors, interval=interval
    )


@batches_app.command("list")
def batches_list(
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="at most this many")] = 20,
    as_json: AsJson = False,
) -> None:
    """The newest batches first."""
    client = _client(base_url, api_key)
    batches = list(itertools.islice(client.batches.list(limit=min(limit, 100)), limit))
    _emit(batches, as_json, _batch_table)


@batches_app.command("get")
def batches_get(
    batch_id: str, base_url: BaseUrl = None, api_key: ApiKey = None, as_json: AsJson = False
) -> None:
    """One batch: status, counts, files, metadata."""
    batch = _client(base_url, api_key).batches.retrieve(batch_id)
    if as_json:
        _print_json(_dump(batch))
    else:
        _show_batch(batch)


@batches_app.command("cancel")
def batches_cancel(
    batch_id: str, base_url: BaseUrl = None, api_key: ApiKey = None, as_json: AsJson = False
) -> None:
    """Cancel a batch (it goes through `cancelling`)."""
    batch = _client(base_url, api_key).batches.cancel(batch_id)
    if as_json:
        _print_json(_dump(batch))
    else:
        print(f"{batch.id} {batch.status}")


@batches_app.command("results")
def batches_results(
    batch_id: str,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    output: OutPath = None,
    errors: ErrPath = None,
) -> None:
    """Download a batch's output and error files."""
    client = _client(base_url, api_key)
    batch = client.batches.retrieve(batch_id)
    if not batch.output_file_id and not batch.error_file_id:
        raise CliError(f"batch {batch_id} ({batch.status}) has no output or error file yet")
    _results(client, batch, output, errors)


@batches_app.command("watch")
def batches_watch(
    batch_id: str,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
    interval: Interval = 2.0,
) -> None:
    """A progress bar until the batch ends; exit 0 only if it completed."""
    client = _client(base_url, api_key)
    try:
        batch = _follow(client, client.batches.retrieve(batch_id), interval)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if as_json:
        _print_json(_dump(batch))
    else:
        print(f"{batch.id} {batch.status}")
    if batch.status != "completed":
        raise typer.Exit(1)


@files_app.command("upload")
def files_upload(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False)],
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Upload FILE with purpose batch; print its id."""
    uploaded = _upload(_client(base_url, api_key), file)
    if as_json:
        _print_json(_dump(uploaded))
    else:
        print(uploaded.id)


@files_app.command("list")
def files_list(
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    purpose: Annotated[str | None, typer.Option("--purpose")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="at most this many")] = 100,
    as_json: AsJson = False,
) -> None:
    """Files, newest first."""
    client = _client(base_url, api_key)
    page = (
        client.files.list(purpose=purpose, limit=min(limit, 10000))
        if purpose
        else client.files.list(limit=min(limit, 10000))
    )
    _emit(list(itertools.islice(page, limit)), as_json, _file_table)


@files_app.command("get")
def files_get(
    file_id: str, base_url: BaseUrl = None, api_key: ApiKey = None, as_json: AsJson = False
) -> None:
    """One file's metadata."""
    f = _client(base_url, api_key).files.retrieve(file_id)
    if as_json:
        _print_json(_dump(f))
    else:
        _show(_file_table([f]))


@files_app.command("download")
def files_download(
    file_id: str,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="default: <file_id>.jsonl; - for stdout")
    ] = None,
) -> None:
    """Download a file's content."""
    client = _client(base_url, api_key)
    if output is not None and str(output) == "-":
        with client.files.with_streaming_response.content(file_id) as resp:
            for chunk in resp.iter_bytes():
                sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        return
    dest = output or Path(f"{file_id}.jsonl")
    _download(client, file_id, dest)
    print(dest)


@files_app.command("delete")
def files_delete(
    file_id: str, base_url: BaseUrl = None, api_key: ApiKey = None, as_json: AsJson = False
) -> None:
    """Delete a file."""
    deleted = _client(base_url, api_key).files.delete(file_id)
    if as_json:
        _print_json(deleted.model_dump(mode="json"))
    else:
        print(f"{deleted.id} deleted" if deleted.deleted else f"{deleted.id} not deleted")


def failure(exc: Exception) -> str | None:
    """The message of a client command's failure (exit 1), or None for any other exception."""
    if isinstance(exc, CliError):
        return str(exc)
    # an SDK exception exists only if a command imported the SDK: no import to find out
    openai = sys.modules.get("openai")
    if openai is None:
        return None
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}: {exc.message}"
    if isinstance(exc, openai.APIError):  # connection errors and timeouts
        return str(exc.message)
    return None
