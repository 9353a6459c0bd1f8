"""The FastAPI app factory: routes, error envelope and request ids, nothing constructed globally.

`create_app(ctx, lifespan=None)` is called by the composition root with an `ApiContext`
(settings, store, blobs, served models, clock). `lifespan` is an optional async context manager
factory (`Callable[[FastAPI], AsyncContextManager[None]]`) the root uses to run background
duties (scheduler, in-process worker) alongside the server.

Routes are plain FastAPI routes grouped by resource (`files`, `batches`, `models`, and the
real-time gateway `realtime`); each module
exposes `router(ctx, auth)` so handlers close over their dependencies instead of reaching into
`app.state`. Every `/v1` route requires a Bearer key; `/health` and `/metrics` do not. OpenAPI
docs are off: the API is OpenAI's and documented there, and an unauthenticated schema page is
one more thing to expose.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from fastapi import FastAPI
from starlette.responses import Response

from backfill.api import batches, files, metrics, models, partial, realtime
from backfill.api.auth import Authenticator
from backfill.api.context import ApiContext
from backfill.api.errors import install_error_handlers
from backfill.api.middleware import RequestIdMiddleware
from backfill.api.responses import JsonResponse

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def create_app(ctx: ApiContext, lifespan: Lifespan | None = None) -> FastAPI:
    app = FastAPI(
        title="backfill",
        lifespan=lifespan,
        default_response_class=JsonResponse,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.ctx = ctx
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)

    auth = Authenticator(ctx.store)
    app.state.auth = auth
    for module in (files, batches, partial, models, realtime):
        app.include_router(module.router(ctx, auth), prefix="/v1")

    app.include_router(metrics.router(ctx.metrics))

    @app.get("/health")
    async def health() -> Response:
        return JsonResponse({"status": "ok"})

    return app
