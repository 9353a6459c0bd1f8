"""JSON responses rendered with orjson, and the store-call hop to a worker thread.

Handlers build plain dicts and return `JsonResponse(...)` themselves instead of letting FastAPI
run `jsonable_encoder` over the result: the objects are already JSON-ready and orjson renders
them several times faster. FastAPI's own `ORJSONResponse` is deprecated, so we keep this tiny
subclass instead.

The `Store` is synchronous (SQL drivers are); `call` runs one store method on anyio's worker
thread pool so a slow query never blocks the event loop.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import anyio.to_thread
import orjson
from starlette.responses import JSONResponse

P = ParamSpec("P")
T = TypeVar("T")


class JsonResponse(JSONResponse):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


async def call(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run a synchronous store method in a worker thread."""
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))
