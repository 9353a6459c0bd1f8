"""The web dashboard at `/ui`, and the three JSON extensions it reads beside the OpenAI API.

The page is plain HTML, CSS and ES-module JavaScript from `api/ui/` (package data, no build
step, nothing from a CDN), served from memory with a strict Content-Security-Policy: scripts,
styles and calls only from this origin. It signs in with an API key kept in the tab's
`sessionStorage` and then calls the same `/v1` API a client does, with the same bearer header,
so it sees exactly one project's batches and files and nothing the API would not show.

What the OpenAI API lacks, three authenticated extensions add (each in the OpenAI error shape
on failure, another project's batch a plain 404):

- `GET /v1/batches/{id}/throughput[?interval=S]`: requests finished per interval. Every
  checkpoint of a shard run is a segment object whose row counts its results and whose blob
  was written when they were recorded, so the series is the segments' counts bucketed by
  their objects' modification times: it comes from the server and survives a page reload
  (and a server restart) with no new table. Segments are removed once the batch is
  finalized, so an ended batch has no series (`points` empty); the page then shows the
  average rate from its timestamps.
- `GET /v1/batches/{id}/errors[?examples=N]`: error lines grouped by code, with a few
  examples each: from the error file once the batch has one, else from the results recorded
  so far (`api/partial.py`), streamed line by line; a failed batch's validation errors too.
- `GET /v1/dashboard/models`: each model's batch limit and in flight beside its real-time
  load, the gateway's TTFT/TPOT and the governor's state (`ApiContext.model_loads`, supplied
  by the composition root: the API never imports the dispatcher or the governor).
"""

# No `from __future__ import annotations`: FastAPI evaluates the handler annotations.
import math
import mimetypes
from collections import defaultdict
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel
from starlette.responses import RedirectResponse, Response

from backfill.api.auth import Authenticator
from backfill.api.batches import own_batch
from backfill.api.context import ApiContext, Latency, ModelLoad
from backfill.api.openapi import ErrorResponse
from backfill.api.partial import batch_results
from backfill.api.responses import JsonResponse, call
from backfill.domain import paths
from backfill.domain.records import BatchRecord, Project
from backfill.domain.segments import iter_lines
from backfill.errors import NotFound

#: most buckets a throughput series has; a longer run gets a coarser interval
MAX_POINTS = 120
#: the intervals a series is drawn at when the client asks for none (seconds)
_NICE_INTERVALS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 86400)
#: distinct error codes listed; the rest are counted under `other`
MAX_CODES = 50
#: characters of an example's message kept
MAX_MESSAGE = 500

_UI = "ui"
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_UI_HEADERS = {
    "content-security-policy": _CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}

# -- throughput -----------------------------------------------------------------------------


def _interval_for(span: float, asked: int | None) -> int:
    smallest = max(1, math.ceil(span / MAX_POINTS))
    if asked is not None:
        return max(asked, smallest)
    return next((s for s in _NICE_INTERVALS if s >= smallest), smallest)


async def throughput(
    ctx: ApiContext, project: Project, batch_id: str, interval: int | None = None
) -> dict[str, Any]:
    """Requests finished per interval, from the recorded segments (see the top)."""
    batch = await own_batch(ctx, project, batch_id)
    segments = await call(ctx.store.segments, batch_id)
    counts = {seg.blob_path: (seg.completed, seg.failed) for seg in segments}
    recorded: list[tuple[float, int, int]] = []
    if counts:
        async for info in ctx.blobs.list_prefix(paths.batch_prefix(batch_id) + "/seg"):
            if info.path in counts:
                recorded.append((info.last_modified, *counts[info.path]))
    recorded.sort()
    points: list[dict[str, int]] = []
    step = interval or 1
    if recorded:
        first = recorded[0][0]
        start = min(first, batch.in_progress_at) if batch.in_progress_at else first
        start = math.floor(start)
        end = max(recorded[-1][0], ctx.clock()) if not _ended(batch) else recorded[-1][0]
        step = _interval_for(end - start, interval)
        buckets = int((end - start) // step) + 1
        done = [[0, 0] for _ in range(buckets)]
        for at, completed, failed in recorded:
            bucket = done[min(buckets - 1, int((at - start) // step))]
            bucket[0] += completed
            bucket[1] += failed
        points = [
            {"start": start + i * step, "completed": c, "failed": f}
            for i, (c, f) in enumerate(done)
        ]
    return {
        "object": "batch.throughput",
        "batch_id": batch.id,
        "status": str(batch.status),
        "interval": step,
        "in_progress_at": batch.in_progress_at,
        "ended_at": _ended(batch),
        "total": batch.total,
        "finished": batch.completed + batch.failed,
        "points": points,
    }


def _ended(batch: BatchRecord) -> int | None:
    """When the batch stopped running requests (None while it runs)."""
    return (
        batch.finalizing_at
        or batch.cancelled_at
        or batch.expired_at
        or batch.failed_at
        or batch.completed_at
    )


# -- errors by code -------------------------------------------------------------------------


@dataclass
class _Group:
    count: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)


class _Grouper:
    def __init__(self, examples: int) -> None:
        self.examples = examples
        self.groups: dict[str, _Group] = defaultdict(_Group)
        self.total = 0

    def add(self, code: str, example: dict[str, Any]) -> None:
        self.total += 1
        if code not in self.groups and len(self.groups) >= MAX_CODES:
            code = "other"
        group = self.groups[code]
        group.count += 1
        if len(group.examples) < self.examples:
            group.examples.append(example)

    def data(self) -> list[dict[str, Any]]:
        ordered = sorted(self.groups.items(), key=lambda kv: (-kv[1].count, kv[0]))
        return [{"code": c, "count": g.count, "examples": g.examples} for c, g in ordered]


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return text[:MAX_MESSAGE]


def _example(
    custom_id: str | None, status: int | None, line: int | None, message: Any
) -> dict[str, Any]:
    return {"custom_id": custom_id, "status_code": status, "line": line, "message": _text(message)}


def classify_error_line(line: bytes) -> tuple[str, dict[str, Any]]:
    """The code of one error-file line and an example of it: the `error` backfill wrote (a
    request that got no answer), else the engine's answer (`response.body.error`)."""
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError:
        text = line[:MAX_MESSAGE].decode(errors="replace")
        return "unreadable_line", _example(None, None, None, text)
    if not isinstance(data, dict):
        data = {}
    custom_id = data.get("custom_id") if isinstance(data.get("custom_id"), str) else None
    error = data.get("error")
    response = data.get("response")
    status: int | None = None
    code: Any = None
    message: Any = None
    if isinstance(error, dict):
        code, message = error.get("code"), error.get("message")
    elif isinstance(response, dict):
        status = (
            response.get("status_code") if isinstance(response.get("status_code"), int) else None
        )
        body = response.get("body")
        inner = body.get("error") if isinstance(body, dict) else None
        if isinstance(inner, dict):
            code = inner.get("code") or inner.get("type")
            message = inner.get("message")
        else:
            message = body
        if not code and status is not None:
            code = f"http_{status}"
    code = code if isinstance(code, str) and code else "unknown_error"
    example = {
        "custom_id": custom_id,
        "status_code": status,
        "line": None,
        "message": _text(message),
    }
    return code[:100], example


async def error_groups(
    ctx: ApiContext, project: Project, batch_id: str, examples: int = 3
) -> dict[str, Any]:
    """The batch's errors by code, most frequent first (see the top)."""
    batch = await own_batch(ctx, project, batch_id)
    grouper = _Grouper(examples)
    for problem in batch.errors or ():
        grouper.add(problem.code, _example(None, None, problem.line, problem.message))
    results = await batch_results(ctx, project, batch_id, "error")
    async for line in iter_lines(results.chunks):
        if line.strip():
            grouper.add(*classify_error_line(line))
    return {
        "object": "batch.errors",
        "batch_id": batch.id,
        "complete": results.complete,
        "total": grouper.total,
        "data": grouper.data(),
    }


# -- models ---------------------------------------------------------------------------------


def _latency(value: Latency | None) -> dict[str, Any] | None:
    if value is None:
        return None
    return {"p50": value.p50, "p90": value.p90, "samples": value.samples}


def model_load_object(
    name: str, endpoints: frozenset[str], load: ModelLoad | None
) -> dict[str, Any]:
    batch = realtime = governor = None
    if load is not None:
        batch = {
            "limit": load.batch_limit,
            "in_flight": load.batch_in_flight,
            "deferred": load.batch_deferred,
        }
        realtime = {
            "in_flight": load.realtime_in_flight,
            "requests": load.realtime_requests,
            "ttft_seconds": _latency(load.ttft),
            "tpot_seconds": _latency(load.tpot),
        }
        governor = {
            "state": load.governor,
            "reference": load.reference,
            "engine_metrics": load.engine_metrics,
        }
    return {
        "id": name,
        "object": "model.load",
        "endpoints": sorted(endpoints),
        "batch": batch,
        "realtime": realtime,
        "governor": governor,
    }


def model_loads(ctx: ApiContext) -> dict[str, Any]:
    loads = {load.name: load for load in ctx.model_loads()}
    data = [model_load_object(n, ctx.models[n], loads.get(n)) for n in sorted(ctx.models)]
    return {"object": "list", "data": data}


# -- the wire format, for /openapi.json only ------------------------------------------------


class ThroughputPoint(BaseModel):
    start: int
    completed: int
    failed: int


class Throughput(BaseModel):
    object: Literal["batch.throughput"]
    batch_id: str
    status: str
    interval: int
    in_progress_at: int | None
    ended_at: int | None
    total: int
    finished: int
    points: list[ThroughputPoint]


class ErrorExample(BaseModel):
    custom_id: str | None
    status_code: int | None
    line: int | None
    message: str | None


class ErrorGroup(BaseModel):
    code: str
    count: int
    examples: list[ErrorExample]


class ErrorGroups(BaseModel):
    object: Literal["batch.errors"]
    batch_id: str
    complete: bool
    total: int
    data: list[ErrorGroup]


class LatencySummary(BaseModel):
    p50: float
    p90: float
    samples: int


class BatchLoad(BaseModel):
    limit: int
    in_flight: int
    deferred: int


class RealtimeLoad(BaseModel):
    in_flight: int
    requests: int
    ttft_seconds: LatencySummary | None
    tpot_seconds: LatencySummary | None


class GovernorState(BaseModel):
    state: Literal["off", "starting", "dormant", "idle", "reference"]
    reference: float | None
    engine_metrics: bool


class ModelLoadObject(BaseModel):
    id: str
    object: Literal["model.load"]
    endpoints: list[str]
    batch: BatchLoad | None
    realtime: RealtimeLoad | None
    governor: GovernorState | None


class ModelLoadList(BaseModel):
    object: Literal["list"]
    data: list[ModelLoadObject]


def _doc(summary: str, model: type[BaseModel], *errors: int) -> dict[str, Any]:
    described = {400: "Bad request", 404: "Not found (or another project's)"}
    responses: dict[int | str, dict[str, Any]] = {200: {"model": model, "description": "OK"}}
    for code in errors:
        responses[code] = {"model": ErrorResponse, "description": described[code]}
    return {"summary": summary, "responses": responses}


# -- HTTP -----------------------------------------------------------------------------------


def router(ctx: ApiContext, auth: Authenticator) -> APIRouter:
    """The JSON extensions, mounted under `/v1`."""
    r = APIRouter()
    CurrentProject = Annotated[Project, Depends(auth.require)]

    @r.get(
        "/batches/{batch_id}/throughput",
        **_doc("Extension: requests finished per interval", Throughput, 400, 404),
    )
    async def batch_throughput(
        batch_id: str,
        project: CurrentProject,
        interval: Annotated[int | None, Query(ge=1, le=86400)] = None,
    ) -> Response:
        return JsonResponse(await throughput(ctx, project, batch_id, interval))

    @r.get(
        "/batches/{batch_id}/errors",
        **_doc("Extension: error lines grouped by code, with examples", ErrorGroups, 400, 404),
    )
    async def batch_errors(
        batch_id: str,
        project: CurrentProject,
        examples: Annotated[int, Query(ge=0, le=20)] = 3,
    ) -> Response:
        return JsonResponse(await error_groups(ctx, project, batch_id, examples))

    @r.get(
        "/dashboard/models",
        **_doc("Extension: each model's batch limit, real-time load and governor", ModelLoadList),
    )
    async def dashboard_models(project: CurrentProject) -> Response:
        return JsonResponse(model_loads(ctx))

    return r


def _assets() -> dict[str, tuple[bytes, str]]:
    """The page's files (flat in `api/ui/`), read once: name -> (bytes, media type)."""
    found: dict[str, tuple[bytes, str]] = {}
    for entry in resources.files("backfill.api").joinpath(_UI).iterdir():
        if entry.is_file() and not entry.name.startswith("."):
            kind = mimetypes.guess_type(entry.name)[0] or "application/octet-stream"
            if entry.name.endswith(".js"):
                kind = "text/javascript"  # module scripts need a JavaScript type
            if kind.startswith("text/"):
                kind += "; charset=utf-8"
            found[entry.name] = (entry.read_bytes(), kind)
    return found


def ui_router() -> APIRouter:
    """`/ui`: the page, its scripts and styles; no key (the page asks for one)."""
    r = APIRouter(include_in_schema=False)
    assets = _assets()

    def asset(name: str) -> Response:
        if name not in assets:
            raise NotFound(f"No such dashboard file: {name}")
        body, kind = assets[name]
        return Response(body, media_type=kind, headers=_UI_HEADERS)

    @r.get("/ui")
    async def ui_root() -> Response:
        return RedirectResponse("/ui/", status_code=307)

    @r.get("/ui/")
    async def ui_index() -> Response:
        return asset("index.html")

    @r.get("/ui/{name}")
    async def ui_file(name: str) -> Response:
        return asset(name)

    return r
