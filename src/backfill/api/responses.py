"""JSON responses rendered with orjson, and the store-call hop to a worker thread.

Handlers build plain dicts and return `JsonResponse(...)` themselves instead of letting FastAPI
run `jsonable_encoder` over the result: the objects are already JSON-ready and orjson renders
them several times faster. FastAPI's own `ORJSONResponse` is deprecated, so we keep this tiny
subclass instead.

The `Store` is synchronous (SQL drivers are); `call` runs one store method on a worker thread
so a slow query never blocks the event loop. The threads come in lanes (anyio capacity
limiters, per event loop): one for reads and one per writing method. When the database is
locked by someone else each write waits up to the store's busy timeout, and blocked writers
must never take the threads that reads need (with one shared pool of 40 threads, a `GET` of a
batch once took 29 s behind blocked uploads), nor those of writes the lock does not hold up
(on PostgreSQL a lock on `files` stops uploads, not batch creation). A write that cannot even
get a thread of its lane within the busy timeout answers `StoreBusy` (503 + `retry-after`)
instead of queueing on. `call` tells reads by the method's name (`READS`); anything else is a
write, the safe side: a write in the read lane could fill it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import anyio
import anyio.to_thread
import orjson
from anyio.lowlevel import RunVar
from starlette.responses import JSONResponse

from backfill.errors import StoreBusy

P = ParamSpec("P")
T = TypeVar("T")

#: store methods that only read (the SQL store runs them on its read-only engine)
READS = frozenset(
    {
        "project_for_key",
        "get_file",
        "list_files",
        "expired_files",
        "file_in_use",
        "get_batch",
        "list_batches",
        "batches_in",
        "shards",
        "segments",
        "usage_of",
        "project_settings",
        "list_api_keys",
        "terminal_batches_with_segments",
        "usage_totals",
    }
)
READ_THREADS = 40
WRITE_THREADS = 8  # per writing method; SQLite runs one writer at a time anyway
DEFAULT_BUSY_TIMEOUT = 5.0  # for a store without `busy_timeout` (the in-memory twin)


class JsonResponse(JSONResponse):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


@dataclass(frozen=True)
class _WriteLane:
    threads: anyio.CapacityLimiter
    # Admission to `threads`, waited for with a deadline (`run_sync` acquires its limiter
    # itself, without one). At most WRITE_THREADS callers pass, so `threads` never blocks.
    slots: anyio.Semaphore


@dataclass(frozen=True)
class _Lanes:
    reads: anyio.CapacityLimiter
    writes: dict[str, _WriteLane]

    def write(self, method: str) -> _WriteLane:
        lane = self.writes.get(method)
        if lane is None:
            lane = self.writes[method] = _WriteLane(
                anyio.CapacityLimiter(WRITE_THREADS), anyio.Semaphore(WRITE_THREADS)
            )
        return lane


_LANES: RunVar[_Lanes] = RunVar("backfill_store_lanes")


def _lanes() -> _Lanes:
    try:
        return _LANES.get()
    except LookupError:
        lanes = _Lanes(anyio.CapacityLimiter(READ_THREADS), {})
        _LANES.set(lanes)
        return lanes


async def call(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run a synchronous store method in a worker thread of its lane."""
    work = functools.partial(fn, *args, **kwargs)
    name = getattr(fn, "__name__", "")
    if name in READS:
        return await anyio.to_thread.run_sync(work, limiter=_lanes().reads)
    lane = _lanes().write(name)
    patience = float(getattr(getattr(fn, "__self__", None), "busy_timeout", DEFAULT_BUSY_TIMEOUT))
    with anyio.move_on_after(patience) as waiting:
        await lane.slots.acquire()
    if waiting.cancelled_caught:
        raise StoreBusy(
            f"no thread free for {name} within {patience:g} s", retry_after=max(1.0, patience)
        )
    try:
        return await anyio.to_thread.run_sync(work, limiter=lane.threads)
    finally:
        lane.slots.release()
