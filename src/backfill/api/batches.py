"""`/v1/batches` (and the `/v1/batch/jobs` aliases): create, retrieve, list, cancel.

Creating a batch checks only the request itself, synchronously: the body's shape, metadata
limits, the endpoint (known, and served by a configured model), the completion window, and the
input file (exists in this project, purpose `batch`). Problems *inside* the file are the
scheduler's business: the batch is written as `validating` and the scheduler moves it on.
A project at its `max_active_batches` (`backfill projects set`) is refused by the store in the
insert's own transaction: 429 `active_batch_limit_exceeded` with `x-should-retry: false`
(`errors.QuotaExceeded`; the enqueued-token limit is checked later, when validation ends).

The body is parsed by hand (orjson, then pydantic) rather than by a FastAPI body parameter so
that curl users who forget `Content-Type: application/json` still work, and so the idempotency
hash is taken over exactly what the client sent: `sha256` of the body re-serialized with sorted
keys. With an `Idempotency-Key` the store returns the batch created earlier under that key for
the same hash and raises `Conflict` (409, not retryable) for a different one.

Cancel only writes `cancelling` (conditional on a cancellable status); the scheduler and
workers notice and finish the job. Cancelling a batch that is already cancelling/cancelled
returns it unchanged; a finished one is a 409 the SDK must not retry.

The use cases are the module-level functions (context, calling project and parsed arguments
in; records out, or an error of `backfill.errors`), one per operation whichever alias path
it came by; the handlers in `router()` only parse the request, call one and render the result.
"""

# No `from __future__ import annotations` here: FastAPI must evaluate the handlers'
# annotations, and `CurrentProject` is a local of `router()`.
import hashlib
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request
from pydantic import ValidationError
from starlette.responses import Response

from backfill.api import openapi
from backfill.api.auth import Authenticator
from backfill.api.context import ApiContext
from backfill.api.errors import validation_error
from backfill.api.responses import JsonResponse, call
from backfill.api.schemas import (
    CreateBatchRequest,
    batch_object,
    check_expires_after_seconds,
    check_metadata,
    list_object,
)
from backfill.api.text import check_json_text, check_text
from backfill.domain.ids import new_batch_id
from backfill.domain.records import BatchRecord, FileRecord, Project
from backfill.domain.statuses import CANCELLABLE, BatchStatus
from backfill.domain.windows import parse_window
from backfill.errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge
from backfill.store.base import Page

#: the endpoints OpenAI batches accept; a batch also needs a configured model that serves its
#: endpoint (`ModelConfig.endpoints`: `/v1/moderations` only where a model declares it)
BATCH_ENDPOINTS = (
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
)
_MAX_IDEMPOTENCY_KEY = 255
#: a create-batch body is a few hundred bytes; metadata at its limits is ~10 KB
MAX_JSON_BODY = 1 << 20
_CANCEL_ATTEMPTS = 5


def not_found(batch_id: str) -> NotFound:
    return NotFound(f"No such Batch object: {batch_id}", param="batch_id")


def parse_create_body(raw: bytes) -> tuple[CreateBatchRequest, dict[str, Any]]:
    try:
        data = orjson.loads(raw) if raw.strip() else None
    except orjson.JSONDecodeError:
        raise validation_error([{"type": "json_invalid", "loc": ("body",)}]) from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_request_body")
    try:
        body = CreateBatchRequest.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # Report unknown arguments first: they usually explain the other errors.
        errors.sort(key=lambda e: e["type"] != "extra_forbidden")
        raise validation_error([{**e, "loc": ("body", *e["loc"])} for e in errors]) from None
    for name, value in data.items():
        check_json_text(value, name)  # ids, metadata keys and values: no NUL, valid Unicode
    return body, data


async def read_small_body(request: Request, limit: int = MAX_JSON_BODY) -> bytes:
    """The request body, refusing (413) to buffer more than `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The request body is too large (at most {limit} bytes).")
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"The request body is too large (at most {limit} bytes).")
        parts.append(chunk)
    return b"".join(parts)


def check_endpoint(endpoint: str, models: dict[str, frozenset[str]]) -> None:
    if endpoint not in BATCH_ENDPOINTS:
        raise InvalidRequest(
            f"Invalid value for 'endpoint': {endpoint!r}. Supported values are: "
            f"{', '.join(BATCH_ENDPOINTS)}.",
            param="endpoint",
            code="invalid_endpoint",
        )
    if not any(endpoint in served for served in models.values()):
        serving = sorted({e for served in models.values() for e in served})
        raise InvalidRequest(
            f"No model configured on this server serves {endpoint} (served here: "
            f"{', '.join(serving) or 'none'}). A model serves it when its configuration "
            "lists it in 'endpoints'.",
            param="endpoint",
            code="unsupported_endpoint",
        )


def request_hash(data: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()


# -- use cases ------------------------------------------------------------------------------


async def submit_batch(
    ctx: ApiContext,
    project: Project,
    body: CreateBatchRequest,
    data: dict[str, Any],
    idempotency_key: str | None,
) -> BatchRecord:
    """Check the request (not the file's lines) and write the batch as `validating`.

    `data` is the body as sent, for the idempotency hash; `idempotency_key` the raw header."""
    check_metadata(body.metadata)
    check_endpoint(body.endpoint, ctx.models)
    settings = ctx.settings
    window = parse_window(
        body.completion_window,
        min_seconds=settings.min_completion_window,
        max_seconds=settings.max_completion_window,
    )
    output_expires_after = None
    if body.output_expires_after is not None:
        output_expires_after = check_expires_after_seconds(
            body.output_expires_after.seconds, "output_expires_after"
        )
    file = await _input_file(ctx, project, body.input_file_id)
    key = _check_idempotency_key(idempotency_key)
    now = ctx.now()
    record = BatchRecord(
        id=new_batch_id(),
        project_id=project.id,
        endpoint=body.endpoint,
        input_file_id=file.id,
        completion_window=body.completion_window,
        status=BatchStatus.VALIDATING,
        created_at=now,
        expires_at=now + window,
        metadata=body.metadata,
        output_expires_after=output_expires_after,
        api_key_id=project.key_id,  # the creating key, for the usage ledger
    )
    return await call(
        ctx.store.insert_batch,
        record,
        idempotency_key=key,
        request_hash=request_hash(data) if key is not None else None,
    )


async def _input_file(ctx: ApiContext, project: Project, file_id: str) -> FileRecord:
    file = await call(ctx.store.get_file, file_id, project.id)
    if file is None:
        raise NotFound(f"No such File object: {file_id}", param="input_file_id")
    if file.purpose != "batch":
        raise InvalidRequest(
            f"File {file.id} has purpose {file.purpose!r}; batch input files must be "
            "uploaded with purpose 'batch'.",
            param="input_file_id",
            code="invalid_file_purpose",
        )
    return file


def _check_idempotency_key(key: str | None) -> str | None:
    if key is None:
        return None
    key = check_text(key.strip(), "Idempotency-Key")
    if not key or len(key) > _MAX_IDEMPOTENCY_KEY:
        raise InvalidRequest(
            f"Idempotency-Key must be 1 to {_MAX_IDEMPOTENCY_KEY} characters.",
            param="Idempotency-Key",
            code="invalid_idempotency_key",
        )
    return key


async def own_batch(ctx: ApiContext, project: Project, batch_id: str) -> BatchRecord:
    """The project's batch `batch_id`, or 404 (also for another project's batch)."""
    record = await call(ctx.store.get_batch, batch_id, project.id)
    if record is None:
        raise not_found(batch_id)
    return record


async def batch_page(
    ctx: ApiContext, project: Project, *, after: str | None, limit: int
) -> Page[BatchRecord]:
    return await call(ctx.store.list_batches, project.id, after=after or None, limit=limit)


async def cancel(ctx: ApiContext, project: Project, batch_id: str) -> BatchRecord:
    """Write `cancelling` if the batch may be cancelled; see the top for the answers."""
    for _ in range(_CANCEL_ATTEMPTS):
        record = await own_batch(ctx, project, batch_id)
        status = BatchStatus(record.status)
        if status in (BatchStatus.CANCELLING, BatchStatus.CANCELLED):
            return record
        if status not in CANCELLABLE:
            raise Conflict(
                f"Cannot cancel batch {batch_id}: it has already finished with status '{status}'.",
                param="batch_id",
                code="batch_not_cancellable",
            )
        moved = await call(
            ctx.store.transition,
            batch_id,
            CANCELLABLE,
            BatchStatus.CANCELLING,
            cancelling_at=ctx.now(),
        )
        if moved is not None:
            return moved
        # The batch changed status under us (e.g. it just completed): look again.
    raise Conflict(
        f"Batch {batch_id} is changing status; try again.", param="batch_id", code="conflict"
    )


# -- HTTP -----------------------------------------------------------------------------------


def router(ctx: ApiContext, auth: Authenticator) -> APIRouter:
    r = APIRouter()
    CurrentProject = Annotated[Project, Depends(auth.require)]

    async def create_batch(request: Request, project: CurrentProject) -> Response:
        body, data = parse_create_body(await read_small_body(request))
        key = request.headers.get("idempotency-key")
        return JsonResponse(batch_object(await submit_batch(ctx, project, body, data, key)))

    async def retrieve_batch(batch_id: str, project: CurrentProject) -> Response:
        return JsonResponse(batch_object(await own_batch(ctx, project, batch_id)))

    async def list_batches(
        project: CurrentProject,
        after: str | None = None,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
    ) -> Response:
        page = await batch_page(ctx, project, after=after, limit=limit)
        return JsonResponse(list_object([batch_object(b) for b in page.items], page.has_more))

    async def cancel_batch(batch_id: str, project: CurrentProject) -> Response:
        return JsonResponse(batch_object(await cancel(ctx, project, batch_id)))

    for prefix in ("/batches", "/batch/jobs"):
        r.add_api_route(prefix, create_batch, methods=["POST"], **openapi.CREATE_BATCH)
        r.add_api_route(prefix, list_batches, methods=["GET"], **openapi.LIST_BATCHES)
        r.add_api_route(
            prefix + "/{batch_id}", retrieve_batch, methods=["GET"], **openapi.RETRIEVE_BATCH
        )
        r.add_api_route(
            prefix + "/{batch_id}/cancel", cancel_batch, methods=["POST"], **openapi.CANCEL_BATCH
        )
    return r
