"""The one place that turns errors into the OpenAI error envelope.

Every error response has the shape `{"error": {"message", "type", "param", "code"}}` with all
four keys present (`backfill.errors.error_body`), whatever raised it:

- `BackfillError` (the service's own tree, `backfill.errors`) carries its status code, type and
  code; we only add headers: `retry-after` for `RateLimited` and `StoreBusy`, and
  `x-should-retry: false` for errors a retry cannot fix (the openai SDK retries 408/409/429/5xx
  by default, and a 409 on cancelling a finished batch must not be retried).
- FastAPI's `RequestValidationError` (bad query parameters) and pydantic's `ValidationError`
  (bad JSON bodies, see `validation_error`) become 400 `invalid_request_error` with `param`
  naming the offending field, worded like OpenAI's messages.
- Starlette's `HTTPException` (unknown route 404, wrong method 405) keeps its status and headers;
  a 405's `Allow` lists the methods of every route on the path (Starlette names only the first
  route's, e.g. `POST` for `/v1/files`, which also serves `GET`).
- Server-side failures (5xx, e.g. `StoreError`) keep their type and code but get a generic
  message: backend messages can carry SQL, paths or URLs, which belong in the log only.
- Anything else is a 500 with a generic message; details go to the log, never to the client.
  That last case is handled by `middleware.RequestIdMiddleware`, which sits outside FastAPI's
  exception middleware, so even a crash gets the envelope and an `x-request-id`.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import compile_path

from backfill.api.responses import JsonResponse
from backfill.errors import (
    BackfillError,
    InvalidRequest,
    RateLimited,
    StoreBusy,
    error_body,
    status_type,
)
from backfill.outages import outage_of

log = logging.getLogger("backfill.api")

SERVER_ERROR_MESSAGE = "The server had an error while processing your request. Sorry about that!"


def error_response(
    status_code: int,
    message: str,
    type_: str,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    return JsonResponse(
        error_body(message, type_, param, code), status_code=status_code, headers=headers
    )


def headers_for(exc: BackfillError) -> dict[str, str]:
    headers = dict(exc.headers)
    if isinstance(exc, RateLimited | StoreBusy):
        headers["retry-after"] = str(max(1, math.ceil(exc.retry_after)))
    if not exc.retryable:
        headers["x-should-retry"] = "false"
    return headers


class _OutageLog:
    """Store and blob-store failures answered to clients: one line (no traceback) per
    `every` seconds with how many were answered since, not a traceback per request: a locked
    database answers hundreds of 503s a minute, and each is the same story."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._next = 0.0
        self._since = 0

    def tell(self, exc: BackfillError) -> None:
        self._since += 1
        now = time.monotonic()
        if now < self._next:
            return
        log.warning(
            "%s: %s (%d such errors answered in the last %gs)",
            type(exc).__name__,
            exc.message,
            self._since,
            self.every,
        )
        self._next = now + self.every
        self._since = 0


_outages = _OutageLog()


def backfill_error_response(exc: BackfillError) -> Response:
    message = exc.message
    if exc.status_code >= 500:
        # Backend messages can carry SQL, paths or URLs: log them, tell the client less.
        if outage_of(exc) is not None:
            _outages.tell(exc)
        else:
            log.error("%s: %s", type(exc).__name__, exc.message, exc_info=exc)
        message = SERVER_ERROR_MESSAGE
    return error_response(
        exc.status_code, message, exc.error_type, exc.param, exc.code, headers_for(exc)
    )


def internal_error_body() -> dict[str, Any]:
    return error_body(SERVER_ERROR_MESSAGE, "server_error")


# -- validation errors ------------------------------------------------------------------------


def _param_of(loc: Sequence[Any]) -> str | None:
    """The user-facing name of the field an error location points at."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    # `{"metadata": {"k": 1}}` reports ("metadata", "k"): name the top-level parameter, which is
    # what OpenAI does and what clients match on.
    return parts[0] if parts else None


def validation_error(errors: Sequence[Mapping[str, Any]]) -> InvalidRequest:
    """The first pydantic/FastAPI validation error as an `InvalidRequest`, OpenAI-worded."""
    if not errors:
        return InvalidRequest("Invalid request.")
    err = errors[0]
    kind = str(err.get("type", ""))
    loc = tuple(err.get("loc", ()))
    param = _param_of(loc)
    if kind == "json_invalid":
        return InvalidRequest(
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, "
            "but what was sent was not valid JSON.)",
            code="invalid_json",
        )
    if param is None:
        return InvalidRequest(
            "The request body must be a JSON object.", code="invalid_request_body"
        )
    if kind == "missing":
        return InvalidRequest(
            f"Missing required parameter: '{param}'.",
            param=param,
            code="missing_required_parameter",
        )
    if kind == "extra_forbidden":
        return InvalidRequest(
            f"Unrecognized request argument supplied: {param}",
            param=param,
            code="unknown_parameter",
        )
    detail = str(err.get("msg", "invalid value"))
    where = ".".join(str(p) for p in loc[1:]) if loc and loc[0] == "body" else param
    return InvalidRequest(
        f"Invalid value for '{where}': {detail}.", param=param, code="invalid_value"
    )


# -- handlers -----------------------------------------------------------------------------------


async def _on_backfill_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BackfillError)
    return backfill_error_response(exc)


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return backfill_error_response(validation_error(exc.errors()))


async def _on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        message, code = f"Invalid URL ({where})", "unknown_url"
    elif exc.status_code == 405:
        message, code = f"Method not allowed ({where})", "method_not_allowed"
        allow = _allowed_methods(request)
        if allow is not None:
            headers = {k: v for k, v in headers.items() if k.lower() != "allow"}
            headers["allow"] = allow
    else:
        message, code = str(exc.detail), None
    if 400 <= exc.status_code < 500 and exc.status_code not in (408, 409, 429):
        headers.setdefault("x-should-retry", "false")
    return error_response(
        exc.status_code, message, status_type(exc.status_code), None, code, headers
    )


#: (path pattern, methods) of every route, for `Allow` (set by the app factory)
RouteMethods = list[tuple[re.Pattern[str], frozenset[str]]]


def route_methods(routes: Iterable[tuple[str, Iterable[str]]]) -> RouteMethods:
    """The `Allow` table of these (path template, methods) pairs."""
    table: dict[str, tuple[re.Pattern[str], set[str]]] = {}
    for path, methods in routes:
        pattern, _, _ = compile_path(path)
        table.setdefault(path, (pattern, set()))[1].update(methods)
    return [(pattern, frozenset(methods)) for pattern, methods in table.values()]


def _allowed_methods(request: Request) -> str | None:
    table: RouteMethods | None = getattr(request.app.state, "route_methods", None)
    if table is None:
        return None
    path = request.url.path
    allowed = {m for pattern, methods in table if pattern.match(path) for m in methods}
    return ", ".join(sorted(allowed)) or None


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(BackfillError, _on_backfill_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
