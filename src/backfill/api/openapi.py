"""The OpenAPI document at `/openapi.json`: what each route takes and answers, for clients and
fuzzers.

Most handlers read their requests by hand (a streamed multipart upload, JSON parsed with orjson
so a missing `Content-Type` still works) and return ready-made `JsonResponse`s, so FastAPI sees
neither a body parameter nor a response model. The route modules therefore register each route
with the keyword arguments defined here (`responses=`, `openapi_extra=`), and `install` adds
what applies to every route at once:

- the bearer security scheme on every `/v1` route, with its 401 and 429 (wrong keys are rate
  limited per address, see `api/auth.py`);
- FastAPI's generated 422 is dropped: bad parameters are answered 400 by `api/errors.py`;
- a `default` response in the OpenAI error shape on every route: the server itself may answer
  any request with 408 (stalled body or headers), 431 (headers too large), 503 (connection
  cap) or 500, in that shape (`api/protocol.py`, `api/middleware.py`).

The response models below exist only to document the wire format; handlers build dicts
(`api/schemas.py`), and the fuzz test (`tests/fuzz`) checks the two agree. Schemas that need
names from route modules (the upload purposes) are built when the document is, which avoids
an import cycle with the modules that import this one.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from backfill import __version__
from backfill.domain.statuses import BatchStatus

URL = "/openapi.json"
VERSION = __version__
SECURITY_SCHEME = "bearerAuth"
#: `openapi_extra` key: JSON schemas of generated parameters to replace, by parameter name
#: (for parameters whose handler type is wider than what they accept, e.g. `kind`)
PARAMETER_SCHEMAS = "x-backfill-parameter-schemas"

# -- the wire format, for documentation only ------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """The OpenAI error envelope; every error has all four keys."""

    error: ErrorDetail


class FileObject(BaseModel):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    expires_at: int | None
    filename: str
    purpose: str
    status: str
    status_details: str | None


class FileList(BaseModel):
    object: Literal["list"]
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"]
    deleted: bool


class BatchErrorLine(BaseModel):
    code: str
    message: str
    param: str | None
    line: int | None


class BatchErrors(BaseModel):
    object: Literal["list"]
    data: list[BatchErrorLine]


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class InputTokensDetails(BaseModel):
    cached_tokens: int


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int


class BatchUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class CostAmount(BaseModel):
    """An amount as OpenAI's costs API gives it."""

    value: float
    currency: str


class BatchCost(BaseModel):
    amount: CostAmount
    realtime_equivalent: CostAmount


class Batch(BaseModel):
    id: str
    object: Literal["batch"]
    endpoint: str
    model: str | None
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    usage: BatchUsage
    metadata: dict[str, str] | None
    #: extensions: when a running batch should finish; a warning that it may not in its window
    estimated_completion_at: int | None
    warning: str | None
    #: extension: what the batch's recorded work costs, and would cost in real time
    cost: BatchCost | None


class BatchList(BaseModel):
    object: Literal["list"]
    data: list[Batch]
    first_id: str | None
    last_id: str | None
    has_more: bool


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    checks: dict[str, str]


class NotReady(ErrorResponse):
    status: str
    checks: dict[str, str]


# -- route keyword arguments --------------------------------------------------------------------

_DESCRIPTIONS = {
    400: "Bad request",
    401: "Missing or incorrect API key",
    404: "Not found (or another project's)",
    409: "Conflict",
    413: "Too large",
    416: "Range not satisfiable",
    429: "Rate limited (see `retry-after`)",
    502: "The upstream engine failed",
    503: "Unavailable (see `retry-after`)",
}
_RETRY_AFTER = {"retry-after": {"description": "Seconds to wait", "schema": {"type": "string"}}}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        out[code] = {"model": ErrorResponse, "description": _DESCRIPTIONS[code]}
        if code in (429, 503):
            out[code]["headers"] = _RETRY_AFTER
    return out


def _ok(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    return {200: {"model": model, "description": "OK"}}


def _json_body(ref: str) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
        }
    }


#: for route modules that describe their own routes (`api/webhooks.py`)
errors_of = _errors
json_body = _json_body

_BINARY = {"schema": {"type": "string", "format": "binary"}}

UPLOAD_FILE: dict[str, Any] = {
    "summary": "Upload a file (streamed)",
    "responses": _ok(FileObject) | _errors(400, 413),
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": {"$ref": "#/components/schemas/UploadFile"}}
            },
        }
    },
}
LIST_FILES: dict[str, Any] = {"summary": "List files", "responses": _ok(FileList) | _errors(400)}
RETRIEVE_FILE: dict[str, Any] = {
    "summary": "Retrieve a file",
    "responses": _ok(FileObject) | _errors(404),
}
FILE_CONTENT: dict[str, Any] = {
    "summary": "Download a file's content (supports one `Range`)",
    "responses": {
        200: {"description": "The whole file", "content": {"application/octet-stream": _BINARY}},
        206: {
            "description": "The range asked for",
            "content": {"application/octet-stream": _BINARY},
        },
    }
    | _errors(404, 416),
    "openapi_extra": {
        "parameters": [
            {
                "name": "Range",
                "in": "header",
                "required": False,
                "schema": {"type": "string"},
                "description": "One byte range, e.g. `bytes=0-1023`",
            }
        ]
    },
}
DELETE_FILE: dict[str, Any] = {
    "summary": "Delete a file",
    "responses": _ok(FileDeleted) | _errors(404, 409),
}

CREATE_BATCH: dict[str, Any] = {
    "summary": "Create a batch",
    "responses": _ok(Batch) | _errors(400, 404, 409, 413),
    "openapi_extra": _json_body("CreateBatchRequest")
    | {
        "parameters": [
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                "description": "The same key and body from the same project return the same batch",
            }
        ]
    },
}
LIST_BATCHES: dict[str, Any] = {
    "summary": "List batches, newest first",
    "responses": _ok(BatchList) | _errors(400),
}
RETRIEVE_BATCH: dict[str, Any] = {
    "summary": "Retrieve a batch",
    "responses": _ok(Batch) | _errors(404),
}
CANCEL_BATCH: dict[str, Any] = {
    "summary": "Cancel a batch",
    "responses": _ok(Batch) | _errors(404, 409),
}
BATCH_OUTPUT: dict[str, Any] = {
    "summary": "Extension: the output (or error) lines finished so far",
    "responses": {
        200: {
            "description": "JSONL; `x-backfill-complete` says whether it is the final file",
            "content": {"application/octet-stream": _BINARY},
            "headers": {
                "x-backfill-complete": {"schema": {"type": "string", "enum": ["true", "false"]}}
            },
        }
    }
    | _errors(400, 404),
    "openapi_extra": {
        PARAMETER_SCHEMAS: {
            "kind": {"type": "string", "enum": ["output", "error"], "default": "output"}
        }
    },
}

LIST_MODELS: dict[str, Any] = {"summary": "List models", "responses": _ok(ModelList)}
RETRIEVE_MODEL: dict[str, Any] = {
    "summary": "Retrieve a model",
    "responses": _ok(Model) | _errors(404),
}

REALTIME: dict[str, Any] = {
    "summary": "Real time: relayed to the model's engine",
    "responses": {
        200: {
            "description": "The engine's answer (server-sent events with `stream: true`)",
            "content": {
                "application/json": {"schema": {"type": "object"}},
                "text/event-stream": {"schema": {"type": "string"}},
            },
        }
    }
    | _errors(400, 404, 429, 502, 503),
    "openapi_extra": _json_body("RealtimeRequest"),
}

METRICS: dict[str, Any] = {
    "summary": "Prometheus metrics (no key)",
    "responses": {
        200: {
            "description": "Prometheus text",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    },
}
HEALTH: dict[str, Any] = {"summary": "Liveness (no key)", "responses": _ok(Health)}
READY: dict[str, Any] = {
    "summary": "Readiness: the store and blob store can be written (no key)",
    "responses": _ok(Ready)
    | {
        503: {
            "model": NotReady,
            "description": "Not ready",
            "headers": _RETRY_AFTER,
        }
    },
}


# -- the document -------------------------------------------------------------------------------


def _extra_schemas() -> dict[str, Any]:
    """Request bodies the handlers parse by hand, as components."""
    from backfill.api.batches import BATCH_ENDPOINTS
    from backfill.api.files import UPLOAD_PURPOSES
    from backfill.api.schemas import (
        MAX_EXPIRES_AFTER,
        MAX_METADATA_KEY,
        MAX_METADATA_PAIRS,
        MAX_METADATA_VALUE,
        MIN_EXPIRES_AFTER,
        CreateBatchRequest,
    )
    from backfill.api.webhooks import SCHEMAS as WEBHOOK_SCHEMAS

    schemas = _component(CreateBatchRequest)
    for model in WEBHOOK_SCHEMAS:
        schemas |= _component(model)
    # limits the handler checks by hand, with OpenAI's wording
    create = schemas["CreateBatchRequest"]["properties"]
    create["input_file_id"]["minLength"] = 1
    create["endpoint"]["enum"] = list(BATCH_ENDPOINTS)
    create["completion_window"].update(
        pattern="^(0|[1-9][0-9]{0,8})[smhd]$",
        description="`24h`, or e.g. `1h`, `90m`, `7d` within the configured range",
    )
    create["metadata"]["anyOf"][0].update(
        maxProperties=MAX_METADATA_PAIRS,
        propertyNames={"maxLength": MAX_METADATA_KEY},
        additionalProperties={"type": "string", "maxLength": MAX_METADATA_VALUE},
    )
    schemas["ExpiresAfter"]["properties"]["seconds"].update(
        minimum=MIN_EXPIRES_AFTER, maximum=MAX_EXPIRES_AFTER
    )
    schemas["UploadFile"] = {
        "type": "object",
        "required": ["file", "purpose"],
        "properties": {
            "file": {"type": "string", "format": "binary"},
            "purpose": {"type": "string", "enum": list(UPLOAD_PURPOSES)},
            "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
            "expires_after[seconds]": {
                "type": "integer",
                "minimum": MIN_EXPIRES_AFTER,
                "maximum": MAX_EXPIRES_AFTER,
            },
        },
        "dependentRequired": {
            "expires_after[anchor]": ["expires_after[seconds]"],
            "expires_after[seconds]": ["expires_after[anchor]"],
        },
    }
    schemas["RealtimeRequest"] = {
        "type": "object",
        "required": ["model"],
        "properties": {"model": {"type": "string", "minLength": 1}, "stream": {"type": "boolean"}},
        "additionalProperties": True,
    }
    return schemas


def _component(model: type[BaseModel]) -> dict[str, Any]:
    """`model` and the models it uses, as components."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    found: dict[str, Any] = schema.pop("$defs", {})
    found[model.__name__] = schema
    return found


def _finish(doc: dict[str, Any]) -> None:
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name, schema in (_extra_schemas() | _component(ErrorResponse)).items():
        schemas.setdefault(name, schema)
    components["securitySchemes"] = {
        SECURITY_SCHEME: {"type": "http", "scheme": "bearer", "description": "An API key"}
    }
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, operations in doc.get("paths", {}).items():
        for operation in operations.values():
            overrides = operation.pop(PARAMETER_SCHEMAS, {})
            for parameter in operation.get("parameters", []):
                if parameter["name"] in overrides:
                    parameter["schema"] = overrides[parameter["name"]]
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            if path.startswith("/v1/"):
                operation["security"] = [{SECURITY_SCHEME: []}]
                for code in (401, 429):
                    responses.setdefault(
                        str(code),
                        {
                            "description": _DESCRIPTIONS[code],
                            "content": {"application/json": {"schema": error}},
                        },
                    )
            responses["default"] = {
                "description": "An error (e.g. 408, 431, 503 from the server itself, or 500)",
                "content": {"application/json": {"schema": error}},
            }
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)


def install(app: FastAPI) -> None:
    """Serve the finished document (built once, on first request) at `app.openapi_url`."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(
                title=app.title,
                version=app.version,
                description="An OpenAI-compatible Batch API (Files, Batches, Models) with a "
                'real-time gateway. Errors are `{"error": {message, type, param, code}}`.',
                routes=app.routes,
            )
            _finish(doc)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = build  # type: ignore[method-assign]
