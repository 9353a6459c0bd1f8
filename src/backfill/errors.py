"""One exception tree for the whole service.

```
BackfillError                      (500 unless a subclass says otherwise)
├── InvalidRequest                 400 invalid_request_error (also an in-process engine's 400)
├── AuthenticationFailed           401 authentication_error
├── NotFound                       404 invalid_request_error
├── Conflict                       409 invalid_request_error (not retryable)
├── PayloadTooLarge                413 invalid_request_error
├── RangeNotSatisfiable            416 invalid_request_error (carries `content-range`)
├── RateLimited                    429 rate_limit_error (carries retry_after)
│   └── QuotaExceeded              429 not retryable: a project quota (domain/projects.py)
├── StoreError                     500 server_error   (metadata backend failed)
│   └── StoreBusy                  503 retryable: locked, no connection (carries retry_after)
├── BlobError                      500 server_error   (object storage failed)
│   └── BlobNotFound               404 (an object that should exist does not)
├── LeaseLost                      409 internal: a fenced write lost its lease
├── ResultsMissing                 500 internal: finalizing found lines with no outcome
└── EngineError                    502 upstream_error (engine failed for good)
    └── EngineUnavailable          503 retryable: connection refused, timeout, ...
```

Each backend translates foreign exceptions at its seam (`raise StoreError(...) from exc`);
the API maps the tree to the OpenAI error envelope in exactly one place
(`backfill.api.errors`). Domain code raises these directly; nothing else leaks out.

`error_body` is the one writer of that envelope, `{"error": {"message", "type", "param",
"code"}}`: the API's answers, the HTTP protocol layer's refusals, the in-process engines'
replies and the error objects put in result lines all build it here.

Exceptions kept outside the tree are private control flow of one module: `api/protocol.py`'s
`_Refused` (stops the HTTP parser; the refusal is sent by the protocol itself) and
`cli/run.py`'s `InvalidFile` (`backfill run` prints the problems and exits 2; no HTTP answer)
and `engines/smollm2.py`'s `FetchFailed` (a default chat model that could not be fetched is
logged and left out; the server starts without it).
The tools (`sim/`, `testing/`) keep their own.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The OpenAI error envelope, with all four keys present whatever is unknown."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def status_type(status: int) -> str:
    """The OpenAI error `type` of an HTTP status that no exception class names."""
    return "server_error" if status >= 500 else "invalid_request_error"


class BackfillError(Exception):
    """Base of every error backfill raises on purpose."""

    status_code: int = 500
    error_type: str = "server_error"
    default_code: str | None = None
    retryable: bool = True
    #: extra headers of the HTTP answer
    headers: Mapping[str, str] = MappingProxyType({})

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code


class InvalidRequest(BackfillError):
    status_code = 400
    error_type = "invalid_request_error"
    retryable = False


class AuthenticationFailed(BackfillError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"
    retryable = False


class NotFound(BackfillError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"
    retryable = False


class Conflict(BackfillError):
    status_code = 409
    error_type = "invalid_request_error"
    default_code = "conflict"
    retryable = False


class PayloadTooLarge(BackfillError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "file_too_large"
    retryable = False


class RangeNotSatisfiable(BackfillError):
    """A well-formed `Range` that starts beyond the end of the file (RFC 9110, 15.5.17)."""

    status_code = 416
    error_type = "invalid_request_error"
    default_code = "range_not_satisfiable"
    retryable = False

    def __init__(self, header: str, size: int) -> None:
        super().__init__(
            f"Range {header!r} cannot be satisfied: the file is {size} bytes.",
            param="range",
        )
        self.headers = {"content-range": f"bytes */{size}"}


class RateLimited(BackfillError):
    status_code = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kw: str | None) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class QuotaExceeded(RateLimited):
    """A project's quota refuses the work (`domain/projects.py`): more active batches than
    allowed at create (429), or enqueued tokens over the limit when a batch starts (the
    scheduler turns that one into the batch's `token_limit_exceeded` error). Retrying soon
    does not help, so the SDK is told not to."""

    retryable = False

    def __init__(self, message: str, *, code: str, retry_after: float = 60.0) -> None:
        super().__init__(message, code=code, retry_after=retry_after)


class StoreError(BackfillError):
    """The metadata store failed (database down, constraint broken, ...)."""


class BlobError(BackfillError):
    """The blob store failed."""


class BlobNotFound(BlobError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"
    retryable = False


class LeaseLost(BackfillError):
    """A fenced write found that its lease had been taken over or ended."""

    status_code = 409
    retryable = False


class EngineError(BackfillError):
    """An engine failed in a way that retrying will not fix."""

    status_code = 502
    error_type = "upstream_error"


class EngineUnavailable(EngineError):
    """The engine could not be reached or timed out: worth retrying."""

    status_code = 503


class ResultsMissing(BackfillError):
    """Finalizing a batch that should be complete found input lines that no recorded segment
    accounts for. Internal: the scheduler reopens those shards so the lines run again rather
    than inventing an outcome for them."""

    def __init__(self, batch_id: str, shards: list[int]) -> None:
        super().__init__(f"batch {batch_id}: shards {shards} lack outcomes for some lines")
        self.batch_id = batch_id
        self.shards = shards


class StoreBusy(StoreError):
    """The metadata store could not be had in time (a lock held elsewhere, no free pooled
    connection): the call gave up before writing anything; try again after `retry_after`."""

    status_code = 503
    default_code = "store_busy"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kw: str | None) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after
