"""`/v1/files`: upload (streamed), list, retrieve, download (with `Range`) and delete.

Ordering of side effects on upload: the blob is written first and the row inserted only after
it is complete, so a `processed` file always has its bytes; any failure after the blob was
written (bad `purpose` arriving after the file, store error, client gone) deletes the blob
again. On delete the row goes first and the blob second: a crash in between leaves an orphan
blob (garbage) rather than a row without bytes (a broken file).

Another project's file is reported exactly like an unknown one (404 "No such File object").

The use cases are the module-level functions (context, calling project and parsed arguments
in; records out, or an error of `backfill.errors`); the handlers in `router()` only parse the
request, call one of them and render the result.
"""

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, Depends, Query, Request
from starlette.requests import ClientDisconnect
from starlette.responses import Response, StreamingResponse

from backfill.api import openapi
from backfill.api.auth import Authenticator
from backfill.api.context import ApiContext
from backfill.api.ranges import parse_range
from backfill.api.responses import JsonResponse, call
from backfill.api.schemas import (
    check_expires_after_seconds,
    deleted_file,
    file_object,
    list_object,
)
from backfill.api.uploads import MultipartUpload, too_large_message
from backfill.domain import paths
from backfill.domain.ids import new_file_id
from backfill.domain.records import FileRecord, Project
from backfill.errors import (
    BlobError,
    BlobNotFound,
    Conflict,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
)
from backfill.store.base import Page

#: purposes a user may upload (`batch_output` files are only ever written by backfill)
UPLOAD_PURPOSES = ("batch", "fine-tune", "assistants", "vision", "user_data", "evals")
#: slack for multipart framing and text fields when rejecting early on Content-Length
_FRAMING_SLACK = 1 << 20
_DOWNLOAD_CHUNK = 1 << 20


def not_found(file_id: str) -> NotFound:
    return NotFound(f"No such File object: {file_id}", param="file_id")


def _check_purpose(purpose: str | None) -> str:
    if purpose is None or purpose == "":
        raise InvalidRequest(
            "Missing required parameter: 'purpose'.",
            param="purpose",
            code="missing_required_parameter",
        )
    if purpose not in UPLOAD_PURPOSES:
        allowed = ", ".join(repr(p) for p in UPLOAD_PURPOSES)
        hint = (
            " ('batch_output' files are created by backfill)" if purpose == "batch_output" else ""
        )
        raise InvalidRequest(
            f"Invalid value for 'purpose': {purpose!r}{hint}. Supported values are: {allowed}.",
            param="purpose",
            code="invalid_value",
        )
    return purpose


def _expires_at(fields: dict[str, str], now: int, *, complete: bool = True) -> int | None:
    """`now` + `expires_after[seconds]`, or None without `expires_after`. Both parts are
    required, as at OpenAI; `complete=False` checks the fields read so far (before the file),
    where a missing anchor may still come after it."""
    anchor = fields.get("expires_after[anchor]")
    seconds_text = fields.get("expires_after[seconds]")
    if anchor is None and seconds_text is None:
        return None
    if anchor is None and complete:
        raise InvalidRequest(
            "Missing required parameter: 'expires_after[anchor]' (it must be 'created_at' "
            "when 'expires_after[seconds]' is given).",
            param="expires_after",
            code="missing_required_parameter",
        )
    if anchor is not None and anchor != "created_at":
        raise InvalidRequest(
            f"Invalid value for 'expires_after[anchor]': {anchor!r}. Supported values are: "
            "'created_at'.",
            param="expires_after[anchor]",
            code="invalid_value",
        )
    if seconds_text is None:
        raise InvalidRequest(
            "Missing required parameter: 'expires_after[seconds]'.",
            param="expires_after[seconds]",
            code="missing_required_parameter",
        )
    try:
        seconds = int(seconds_text.strip())
    except ValueError:
        raise InvalidRequest(
            f"Invalid value for 'expires_after[seconds]': {seconds_text!r} is not an integer.",
            param="expires_after[seconds]",
            code="invalid_value",
        ) from None
    return now + check_expires_after_seconds(seconds, "expires_after[seconds]")


# -- use cases ------------------------------------------------------------------------------


async def own_file(ctx: ApiContext, project: Project, file_id: str) -> FileRecord:
    """The project's file `file_id`, or 404 (also for another project's file)."""
    record = await call(ctx.store.get_file, file_id, project.id)
    if record is None:
        raise not_found(file_id)
    return record


async def store_upload(ctx: ApiContext, project: Project, upload: MultipartUpload) -> FileRecord:
    """Stream the upload's file part into a new blob, then insert its row (see the top)."""
    await upload.read_until_file()
    if not upload.file_started:
        await upload.read_rest()
        raise InvalidRequest(
            "Missing required parameter: 'file'.",
            param="file",
            code="missing_required_parameter",
        )
    # Fail fast on fields that came before the file, before streaming it.
    if "purpose" in upload.fields:
        _check_purpose(upload.fields["purpose"])
    if "expires_after[seconds]" in upload.fields:
        _expires_at(upload.fields, 0, complete=False)
    file_id = new_file_id()
    path = paths.file_path(file_id)
    size = await ctx.blobs.put_stream(path, upload.file_chunks())
    try:
        await upload.read_rest()
        purpose = _check_purpose(upload.fields.get("purpose"))
        now = ctx.now()
        expires_at = _expires_at(upload.fields, now)
        default_expiry = ctx.settings.batch_file_expiry_seconds
        if expires_at is None and purpose == "batch" and default_expiry:
            expires_at = now + default_expiry  # as OpenAI: batch files expire after 30 days
        record = FileRecord(
            id=file_id,
            project_id=project.id,
            filename=upload.filename or "file",
            purpose=purpose,
            bytes=size,
            created_at=now,
            blob_path=path,
            expires_at=expires_at,
            status="processed",
        )
        await call(ctx.store.insert_file, record)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await ctx.blobs.delete(path)
        raise
    return record


async def file_page(
    ctx: ApiContext,
    project: Project,
    *,
    purpose: str | None,
    order: Literal["asc", "desc"],
    limit: int,
    after: str | None,
) -> Page[FileRecord]:
    return await call(
        ctx.store.list_files,
        project.id,
        purpose=purpose or None,
        order=order,
        after=after or None,
        limit=limit,
    )


@dataclass(frozen=True)
class Download:
    """Bytes `start..end` (end exclusive) of a file of `size` bytes; `chunks` is None when
    the range is empty (nothing is read from the blob store then)."""

    size: int
    start: int
    end: int
    ranged: bool  # a `Range` was honoured: 206 with `Content-Range`
    chunks: AsyncIterator[bytes] | None


async def download_file(
    ctx: ApiContext, project: Project, file_id: str, range_header: str | None
) -> Download:
    record = await own_file(ctx, project, file_id)
    size = record.bytes
    wanted = parse_range(range_header, size)
    start, end = wanted if wanted is not None else (0, size)
    if end <= start:
        return Download(size, start, end, wanted is not None, None)
    chunks = ctx.blobs.stream(record.blob_path, start, end, chunk_size=_DOWNLOAD_CHUNK)
    # Pull the first chunk now so a missing object is an error envelope, not a cut stream.
    try:
        first = await anext(chunks, None)
    except BlobNotFound:
        raise NotFound(
            f"The content of {file_id} is no longer available.", param="file_id"
        ) from None
    if first is None:
        raise BlobError(f"blob {record.blob_path} is shorter than its recorded size")
    return Download(size, start, end, wanted is not None, _prepend(first, chunks))


async def _prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for chunk in rest:
        yield chunk


async def delete_own_file(ctx: ApiContext, project: Project, file_id: str) -> None:
    """Delete the row first, then the blob: a crash between leaves garbage, not a broken file."""
    await own_file(ctx, project, file_id)
    if await call(ctx.store.file_in_use, file_id):
        raise Conflict(
            f"File {file_id} is the input of a batch that has not finished; cancel the "
            "batch or wait for it to finish before deleting the file.",
            param="file_id",
            code="file_in_use",
        )
    record = await call(ctx.store.delete_file, file_id, project.id)
    if record is None:
        raise not_found(file_id)
    await ctx.blobs.delete(record.blob_path)


# -- HTTP -----------------------------------------------------------------------------------


def _content_length(request: Request) -> int | None:
    raw = request.headers.get("content-length")
    if raw is None or not raw.strip().isdigit():
        return None
    return int(raw)


def _upload_of(request: Request, limit: int) -> MultipartUpload:
    """The request's multipart body, refused at once (413) when it declares too many bytes."""
    body_bytes = _content_length(request)
    if body_bytes is not None and body_bytes > limit + _FRAMING_SLACK:
        raise PayloadTooLarge(too_large_message(limit, body_bytes), param="file")
    return MultipartUpload(
        request.headers.get("content-type"),
        request.stream(),
        max_file_bytes=limit,
        body_bytes=body_bytes,
    )


def _download_response(download: Download) -> Response:
    start, end = download.start, download.end
    headers = {"accept-ranges": "bytes", "content-length": str(end - start)}
    if download.ranged:
        headers["content-range"] = f"bytes {start}-{end - 1}/{download.size}"
    status = 206 if download.ranged else 200
    media_type = "application/octet-stream"
    if download.chunks is None:
        return Response(b"", status_code=status, headers=headers, media_type=media_type)
    return StreamingResponse(
        download.chunks, status_code=status, headers=headers, media_type=media_type
    )


def router(ctx: ApiContext, auth: Authenticator) -> APIRouter:
    r = APIRouter()
    CurrentProject = Annotated[Project, Depends(auth.require)]

    @r.post("/files", **openapi.UPLOAD_FILE)
    async def upload_file(request: Request, project: CurrentProject) -> Response:
        upload = _upload_of(request, ctx.settings.max_upload_bytes)
        try:
            record = await store_upload(ctx, project, upload)
        except ClientDisconnect:
            # Nobody is listening; the blob was already cleaned up.
            return Response(status_code=400)
        return JsonResponse(file_object(record))

    @r.get("/files", **openapi.LIST_FILES)
    async def list_files(
        project: CurrentProject,
        purpose: str | None = None,
        order: Literal["asc", "desc"] = "desc",
        limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
        after: str | None = None,
    ) -> Response:
        page = await file_page(ctx, project, purpose=purpose, order=order, limit=limit, after=after)
        return JsonResponse(list_object([file_object(f) for f in page.items], page.has_more))

    @r.get("/files/{file_id}", **openapi.RETRIEVE_FILE)
    async def retrieve_file(file_id: str, project: CurrentProject) -> Response:
        return JsonResponse(file_object(await own_file(ctx, project, file_id)))

    @r.get("/files/{file_id}/content", **openapi.FILE_CONTENT)
    async def file_content(file_id: str, request: Request, project: CurrentProject) -> Response:
        range_header = request.headers.get("range")
        return _download_response(await download_file(ctx, project, file_id, range_header))

    @r.delete("/files/{file_id}", **openapi.DELETE_FILE)
    async def delete_file(file_id: str, project: CurrentProject) -> Response:
        await delete_own_file(ctx, project, file_id)
        return JsonResponse(deleted_file(file_id))

    return r
