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
"""

# No `from __future__ import annotations`: FastAPI evaluates the handler annotations.
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from starlette.responses import Response, StreamingResponse

from backfill.api import openapi
from backfill.api.auth import Authenticator
from backfill.api.context import ApiContext
from backfill.api.responses import call
from backfill.domain.records import Project, Segment
from backfill.domain.results import ERROR, OUTPUT
from backfill.domain.segments import index_shard, shard_lines
from backfill.errors import BlobNotFound, InvalidRequest, NotFound

_CHUNK = 1 << 20


def router(ctx: ApiContext, auth: Authenticator) -> APIRouter:
    r = APIRouter()
    CurrentProject = Annotated[Project, Depends(auth.require)]

    async def batch_output(
        batch_id: str, project: CurrentProject, kind: Annotated[str, Query()] = "output"
    ) -> Response:
        if kind not in ("output", "error"):
            raise InvalidRequest("kind must be 'output' or 'error'.", param="kind")
        batch = await call(ctx.store.get_batch, batch_id, project.id)
        if batch is None:
            raise NotFound(f"No such Batch object: {batch_id}", param="batch_id")
        final_id = batch.output_file_id if kind == "output" else batch.error_file_id
        media = "application/octet-stream"
        if final_id is not None:
            file = await call(ctx.store.get_file, final_id)
            if file is not None:
                return StreamingResponse(
                    ctx.blobs.stream(file.blob_path, chunk_size=_CHUNK),
                    media_type=media,
                    headers={"x-backfill-complete": "true", "content-length": str(file.bytes)},
                )
        segments = await call(ctx.store.segments, batch_id)
        by_shard: dict[int, list[Segment]] = defaultdict(list)
        for seg in segments:
            by_shard[seg.shard_index].append(seg)
        wanted = OUTPUT if kind == "output" else ERROR

        async def body() -> AsyncIterator[bytes]:
            for shard in sorted(by_shard):
                paths = [seg.blob_path for seg in by_shard[shard]]
                try:
                    index = await index_shard(ctx.blobs, paths)
                    async for chunk in shard_lines(ctx.blobs, paths, index, wanted):
                        yield chunk
                except BlobNotFound:
                    return  # finalized meanwhile: the final file has it all

        return StreamingResponse(body(), media_type=media, headers={"x-backfill-complete": "false"})

    for prefix in ("/batches", "/batch/jobs"):
        r.add_api_route(
            prefix + "/{batch_id}/output", batch_output, methods=["GET"], **openapi.BATCH_OUTPUT
        )
    return r
