"""Client text that no store could keep: NUL characters and lone surrogates, refused with a 400.

PostgreSQL refuses a NUL in any text value (the driver raises before the query is sent: a 500
before this check existed) and no database takes a string that is not valid Unicode, while
SQLite and the memory store take both. So that every backend gives the same answer, the API
refuses such text itself, in the OpenAI error envelope, before anything reaches the store:

- `reject_invalid_text`: a dependency of every `/v1` route (installed once, in `app.py`) that
  checks the path parameters (ids, model names) and the query parameters (`after`, `purpose`,
  ...). It runs before the route's own parameters are read, so before the key is checked too:
  a 400 for such a URL tells nobody anything about the data behind it.
- `check_text` / `check_json_text`: for text inside requests, called where it is read:
  multipart filenames and fields (`uploads.py`), the create-batch body (file id, metadata keys
  and values, ...) and its `Idempotency-Key` header (`batches.py`).

The SQL store turns the same driver failures into `InvalidRequest` too, as a backstop for any
path that was missed (`SqlStore._run`).
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from backfill.errors import InvalidRequest


def text_problem(value: str) -> str | None:
    """Why `value` cannot be stored as text, or None if it can."""
    if "\x00" in value:
        return "it must not contain NUL (\\u0000) characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "it is not valid Unicode text (it contains a lone surrogate)"
    return None


def check_text(value: str, param: str) -> str:
    """`value`, or `InvalidRequest` (400) naming `param`."""
    problem = text_problem(value)
    if problem is not None:
        raise InvalidRequest(
            f"Invalid value for '{param}': {problem}.", param=param, code="invalid_value"
        )
    return value


def check_json_text(value: Any, param: str) -> None:
    """Check every string (keys too) inside a parsed JSON value; errors name `param`."""
    if isinstance(value, str):
        check_text(value, param)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key, param)
            check_json_text(item, param)
    elif isinstance(value, list):
        for item in value:
            check_json_text(item, param)


async def reject_invalid_text(request: Request) -> None:
    """FastAPI dependency: 400 on a path or query parameter no store could keep."""
    for name, value in request.path_params.items():
        if isinstance(value, str):
            check_text(value, name)
    for name, value in request.query_params.multi_items():
        check_text(value, name)
