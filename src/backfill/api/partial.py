"""`GET /v1/batches/{id}/output`: the results finished so far, while the batch still runs.

An extension to the OpenAI API (documented in README.md): a user of a long batch need not wait
for the whole of it. While the batch runs, this streams the output lines (or, with
`?kind=error`, the error lines) of every recorded segment, shard by shard, each shard in input
order; what is recorded is durable, so a line seen here is in the final file too. Once the
batch has its final output (or error) file, this streams that file instead. A batch with
nothing finished yet answers an empty body. The merge is the finalizer's
(`backfill.domain.segments`): it streams, so memory stays at a few MB however large the shard
or its answers.

The response carries `x-backfill-complete: true|false` so a client knows whether it got the
final file or a snapshot.

`batch_results` is the use case; the handler in `router()` only calls it and renders the result.
"""

# No `from __future__ import annotations`: FastAPI evaluates the handler annotations.
import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from starlette.responses import Response, StreamingResponse

from backfill.api import openapi
from backfill.api.auth import Authenticator
from backfill.api.batches import own_batch
from backfill.api.context import ApiContext
from backfill.api.responses import call
from backfill.blobs.base import Blobs
from backfill.domain.records import Project, Segment
from backfill.domain.results import ERROR, OUTPUT, ResultKind
from backfill.domain.segments import index_shard, shard_lines
from backfill.errors import BlobNotFound, InvalidRequest

log = logging.getLogger("backfill.api")

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Results:
    """The lines of one kind: the final file (`complete`, of `bytes` bytes) or a snapshot."""

    complete: bool
    chunks: AsyncIterator[bytes]
    bytes: int | None = None


async def batch_results(ctx: ApiContext, project: Project, batch_id: str, kind: str) -> Results:
    """The output (or, with `kind="error"`, error) lines of the project's batch so far."""
    if kind not in ("output", "error"):
        raise InvalidRequest("kind must be 'output' or 'error'.", param="kind")
    batch = await own_batch(ctx, project, batch_id)
    final_id = batch.output_file_id if kind == "output" else batch.error_file_id
    if final_id is not None:
        file = await call(ctx.store.get_file, final_id)
        if file is not None:
            return Results(True, ctx.blobs.stream(file.blob_path, chunk_size=_CHUNK), file.bytes)
    segments = await call(ctx.store.segments, batch_id)
    by_shard: dict[int, list[Segment]] = defaultdict(list)
    for seg in segments:
        by_shard[seg.shard_index].append(seg)
    wanted = OUTPUT if kind == "output" else ERROR
    return Results(False, _recorded_lines(ctx.blobs, by_shard, wanted))


async def _recorded_lines(
    blobs: Blobs, by_shard: dict[int, list[Segment]], wanted: ResultKind
) -> AsyncIterator[bytes]:
    for shard in sorted(by_shard):
        paths = [seg.blob_path for seg in by_shard[shard]]
        try:
            index = await index_shard(blobs, paths)
            async for chunk in shard_lines(blobs, paths, index, wanted):
                yield chunk
        except BlobNotFound:
            # finalized meanwhile (its segments deleted): the final file has it all. The
            # snapshot may end inside this shard; it holds whole lines only
            log.debug("partial output of shard %d ended: the batch was finalized", shard)
            return


def _results_response(results: Results) -> Response:
    if results.complete:
        headers = {"x-backfill-complete": "true", "content-length": str(results.bytes)}
    else:
        headers = {"x-backfill-complete": "false"}
    return StreamingResponse(results.chunks, media_type="application/octet-stream", headers=headers)


def router(ctx: ApiContext, auth: Authenticator) -> APIRouter:
    r = APIRouter()
    CurrentProject = Annotated[Project, Depends(auth.require)]

    async def batch_output(
        batch_id: str, project: CurrentProject, kind: Annotated[str, Query()] = "output"
    ) -> Response:
        return _results_response(await batch_results(ctx, project, batch_id, kind))

    for prefix in ("/batches", "/batch/jobs"):
        r.add_api_route(
            prefix + "/{batch_id}/output", batch_output, methods=["GET"], **openapi.BATCH_OUTPUT
        )
    return r
