"""One exception tree for the whole service.

```
BackfillError                      (500 unless a subclass says otherwise)
├── InvalidRequest                 400 invalid_request_error
├── AuthenticationFailed           401 authentication_error
├── PermissionDenied               403 permission_error
├── NotFound                       404 invalid_request_error
├── Conflict                       409 invalid_request_error (not retryable)
├── PayloadTooLarge                413 invalid_request_error
├── Unprocessable                  422 invalid_request_error
├── RateLimited                    429 rate_limit_error (carries retry_after)
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
"""

from __future__ import annotations


class BackfillError(Exception):
    """Base of every error backfill raises on purpose."""

    status_code: int = 500
    error_type: str = "server_error"
    default_code: str | None = None
    retryable: bool = True

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

    def to_dict(self) -> dict[str, str | None]:
        return {
            "message": self.message,
            "type": self.error_type,
            "param": self.param,
            "code": self.code,
        }


class InvalidRequest(BackfillError):
    status_code = 400
    error_type = "invalid_request_error"
    retryable = False


class AuthenticationFailed(BackfillError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"
    retryable = False


class PermissionDenied(BackfillError):
    status_code = 403
    error_type = "permission_error"
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


class Unprocessable(BackfillError):
    status_code = 422
    error_type = "invalid_request_error"
    retryable = False


class RateLimited(BackfillError):
    status_code = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kw: str | None) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


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
