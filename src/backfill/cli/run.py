"""`backfill run INPUT.jsonl -o OUTPUT.jsonl`: one batch file, offline, no server.

The same parts as a served batch, minus the store and blobs: the input is checked by the batch
validator (`domain.validation`: same codes, every problem listed by line, nothing runs if the
file is bad), requests go through the same `Dispatcher` (concurrency window, retries) to the
same engines (upstream URLs or in-process), and results are the same output/error lines
(`domain.results`).

Resumable: output and error files are append-only and flushed at least every
`FLUSH_SECONDS` (and every `FLUSH_LINES` lines), so a kill loses at most the requests in flight
and the last fraction of a second. A rerun reads the custom_ids already present in both files
(dropping a torn last line first) and skips them, so every custom_id ends up exactly once.
Ctrl-C (or SIGTERM) stops dispatching, writes what finished and exits 130.

Lines are written in completion order, not input order (join on `custom_id`). Progress goes to
stderr: a redrawn bar on a terminal, a line every few seconds otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from backfill.dispatch.dispatcher import Dispatcher
from backfill.domain import exact_json
from backfill.domain.records import Usage
from backfill.domain.validation import BOM, InputValidator, ValidationLimits
from backfill.service import start_offline_model
from backfill.settings import Settings
from backfill.worker.outcomes import run_request

FLUSH_SECONDS = 0.5
FLUSH_LINES = 256
CHUNK = 1 << 20


class InvalidFile(Exception):
    """The input file did not validate; the message lists the problems by line."""


@dataclass(slots=True)
class RunSummary:
    total: int = 0
    skipped: int = 0  # already in the output/error files from an earlier run
    completed: int = 0
    failed: int = 0
    interrupted: bool = False
    usage: Usage = Usage()  # noqa: RUF009 (frozen value)


def default_errors_path(output: Path) -> Path:
    name = output.name.removesuffix(".jsonl")
    return output.with_name(f"{name}.errors.jsonl")


def first_url(path: Path) -> str | None:
    """The `url` of the first non-blank line: the endpoint the whole file must target."""
    with path.open("rb") as fh:
        for raw in fh:
            raw = raw.removeprefix(BOM).strip()
            if not raw:
                continue
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError:
                return None
            url = obj.get("url") if isinstance(obj, dict) else None
            return url if isinstance(url, str) else None
    return None


def done_ids(path: Path) -> set[str]:
    """custom_ids already written to a result file; a torn last line is cut off first."""
    ids: set[str] = set()
    if not path.exists():
        return ids
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with path.open("r+b") as fh:
            fh.truncate(end)
    for raw in data[:end].split(b"\n"):
        if raw.strip():
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
                cid = orjson.loads(raw).get("custom_id")
                if isinstance(cid, str):
                    ids.add(cid)
    return ids


class Progress:
    def __init__(self, total: int, done: int, stream: IO[str], enabled: bool) -> None:
        self.total, self.done, self.start_done = total, done, done
        self.stream = stream
        self.enabled = enabled
        self.tty = stream.isatty()
        self.t0 = time.monotonic()
        self.last = 0.0

    def update(self, n: int = 1, *, force: bool = False) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self.last < (0.2 if self.tty else 5.0):
            return
        self.last = now
        elapsed = max(now - self.t0, 1e-9)
        rate = (self.done - self.start_done) / elapsed
        left = self.total - self.done
        eta = f"{left / rate:.0f}s" if rate > 0 else "?"
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(frac * 30)
        line = f"[{bar:<30}] {self.done}/{self.total} {rate:.1f} req/s eta {eta}"
        if self.tty:
            self.stream.write("\r" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.update(0, force=True)
            if self.tty:
                self.stream.write("\n")
            self.stream.flush()


class ResultWriter:
    """Append-only output and error files, flushed by size and by time."""

    def __init__(self, output: Path, errors: Path) -> None:
        output.parent.mkdir(parents=True, exist_ok=True)
        errors.parent.mkdir(parents=True, exist_ok=True)
        self._out = output.open("ab")
        self._err = errors.open("ab")
        self._pending = 0
        self._last = time.monotonic()

    def add(self, line: bytes, ok: bool) -> None:
        (self._out if ok else self._err).write(line + b"\n")
        self._pending += 1
        if self._pending >= FLUSH_LINES or time.monotonic() - self._last >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        self._out.flush()
        self._err.flush()
        self._pending = 0
        self._last = time.monotonic()

    def close(self) -> None:
        self.flush()
        self._out.close()
        self._err.close()


def validate(path: Path, endpoint: str, settings: Settings) -> tuple[int, str | None, list[str]]:
    """(requests, model, problems) of the input file, checked as the batch API checks it."""
    served = {m.name: frozenset(m.endpoints) for m in settings.models}
    limits = ValidationLimits(
        max_requests=sys.maxsize,
        max_errors=settings.max_validation_errors,
        max_line_bytes=settings.max_line_bytes,
        shard_size=sys.maxsize,
    )
    validator = InputValidator(batch_id="run", endpoint=endpoint, served=served, limits=limits)
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            validator.feed(chunk)
    result = validator.finish()
    problems = [
        f"line {e.line}: {e.code}: {e.message}" if e.line else f"{e.code}: {e.message}"
        for e in result.errors
    ]
    return result.total, result.model, problems


async def run_file(
    settings: Settings,
    input_path: Path,
    output_path: Path,
    errors_path: Path,
    *,
    progress: bool = True,
    concurrency: int | None = None,
    stop: asyncio.Event | None = None,
    stderr: IO[str] = sys.stderr,
) -> RunSummary:
    """Run every request of `input_path` not yet in the result files. Raises `InvalidFile`
    with the problems when the file does not validate."""
    endpoint = first_url(input_path) or "/v1/chat/completions"
    total, model, problems = await asyncio.to_thread(validate, input_path, endpoint, settings)
    if problems:
        raise InvalidFile("\n".join(problems))
    summary = RunSummary(total=total)
    seen = done_ids(output_path) | done_ids(errors_path)
    config = next(m for m in settings.models if m.name == model)
    if concurrency is not None:
        config = config.model_copy(update={"max_concurrency": concurrency})
    dispatcher = await start_offline_model(settings, config)
    engine = dispatcher.engine
    writer = ResultWriter(output_path, errors_path)
    bar = Progress(total, 0, stderr, progress)
    stop = stop or asyncio.Event()
    try:
        await _dispatch(input_path, endpoint, seen, dispatcher, writer, bar, summary, stop)
    finally:
        writer.close()
        bar.close()
        await engine.close()
    summary.interrupted = stop.is_set()
    return summary


async def _dispatch(
    input_path: Path,
    endpoint: str,
    seen: set[str],
    dispatcher: Dispatcher,
    writer: ResultWriter,
    bar: Progress,
    summary: RunSummary,
    stop: asyncio.Event,
) -> None:
    slots = asyncio.Semaphore(max(16, dispatcher.limit))
    running: set[asyncio.Task[None]] = set()

    async def one(custom_id: str, body: dict[str, Any]) -> None:
        done = await run_request(dispatcher, endpoint, custom_id, body, stopped=stop.is_set)
        if done is None:
            return  # interrupted before it was sent: the next run does it
        summary.usage = summary.usage + done.usage
        writer.add(done.line, done.ok)
        if done.ok:
            summary.completed += 1
        else:
            summary.failed += 1
        bar.update()

    def finished(task: asyncio.Task[None]) -> None:
        running.discard(task)
        slots.release()

    async def abort_on_stop() -> None:
        await stop.wait()
        for task in list(running):
            task.cancel()

    watcher = asyncio.create_task(abort_on_stop())
    try:
        with input_path.open("rb") as fh:
            for raw in fh:
                raw = raw.removeprefix(BOM).strip()
                if not raw:
                    continue
                obj = exact_json.loads(raw)
                cid: str = obj["custom_id"]
                if cid in seen:
                    summary.skipped += 1
                    bar.update()
                    continue
                await slots.acquire()
                if stop.is_set():
                    slots.release()
                    break
                task = asyncio.create_task(one(cid, obj["body"]))
                running.add(task)
                task.add_done_callback(finished)
        if running:
            await asyncio.gather(*list(running), return_exceptions=True)
    finally:
        watcher.cancel()


def main(
    settings: Settings,
    input_path: Path,
    output_path: Path,
    errors_path: Path | None,
    *,
    progress: bool = True,
    concurrency: int | None = None,
) -> int:
    """The `backfill run` command; returns the exit code."""
    errors_path = errors_path or default_errors_path(output_path)
    if not input_path.is_file():
        print(f"backfill: no such file: {input_path}", file=sys.stderr)
        return 2

    async def go() -> RunSummary:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await run_file(
            settings,
            input_path,
            output_path,
            errors_path,
            progress=progress,
            concurrency=concurrency,
            stop=stop,
        )

    try:
        summary = asyncio.run(go())
    except InvalidFile as exc:
        print(f"backfill: {input_path} is not a valid batch file:\n{exc}", file=sys.stderr)
        return 2
    u = summary.usage
    print(
        f"{summary.completed} completed, {summary.failed} failed, {summary.skipped} already done "
        f"of {summary.total}; tokens in {u.input_tokens}, out {u.output_tokens}\n"
        f"output: {output_path}\nerrors: {errors_path}",
        file=sys.stderr,
    )
    if summary.interrupted:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    return 0
