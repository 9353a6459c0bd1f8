"""The FastAPI app factory: routes, error envelope and request ids, nothing constructed globally.

`create_app(ctx, lifespan=None)` is called by the composition root with an `ApiContext`
(settings, store, blobs, served models, clock). `lifespan` is an optional async context manager
factory (`Callable[[FastAPI], AsyncContextManager[None]]`) the root uses to run background
duties (scheduler, in-process worker) alongside the server.

Routes are plain FastAPI routes grouped by resource (`files`, `batches`, `models`, the
real-time gateway `realtime`, and `dashboard`: the page at `/ui` and its JSON extensions); each
module exposes `router(ctx, auth)` so handlers close over their dependencies instead of reaching
into `app.state`. Every `/v1` route requires a Bearer key; `/health`, `/health/ready`, `/metrics`,
`/openapi.json` and the dashboard's files under `/ui` do not.

`/openapi.json` describes the whole API (see `api/openapi.py`) so clients and fuzzers can be
generated from it; the interactive `/docs` pages stay off: they load scripts from a CDN and are
one more page to expose.

The limits on headers, bodies and connections live in the server's protocol
(`api/protocol.py`), outside the app: most of them act before a request exists.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from fastapi import Depends, FastAPI
from fastapi.routing import APIRoute
from starlette.responses import Response

from backfill.api import (
    batches,
    dashboard,
    files,
    metrics,
    models,
    openapi,
    organization,
    partial,
    realtime,
    webhooks,
)
from backfill.api.auth import Authenticator
from backfill.api.context import ApiContext
from backfill.api.errors import install_error_handlers, route_methods
from backfill.api.health import Readiness
from backfill.api.ledger import RealtimeLedger
from backfill.api.middleware import RequestIdMiddleware
from backfill.api.responses import JsonResponse
from backfill.api.text import reject_invalid_text

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def create_app(ctx: ApiContext, lifespan: Lifespan | None = None) -> FastAPI:
    app = FastAPI(
        title="backfill",
        lifespan=lifespan,
        default_response_class=JsonResponse,
        docs_url=None,
        redoc_url=None,
        openapi_url=openapi.URL,
        version=openapi.VERSION,
    )
    settings = ctx.settings
    app.state.ctx = ctx
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)

    auth = Authenticator(
        ctx.store,
        failure_limit=settings.auth_failure_limit,
        failure_window=settings.auth_failure_window_seconds,
    )
    app.state.auth = auth
    if ctx.realtime_ledger is None:  # one ledger writer, shared by the gateway and /metrics
        ctx.realtime_ledger = RealtimeLedger(settings, ctx.store)
    resources = (files, batches, partial, dashboard, models, realtime, webhooks, organization)
    routers = [(m.router(ctx, auth), "/v1") for m in resources]
    for router, prefix in routers:
        app.include_router(
            router,
            prefix=prefix,
            # NUL or invalid Unicode in a path or query parameter: 400 on every store backend
            dependencies=[Depends(reject_invalid_text)],
        )

    ledger = ctx.realtime_ledger
    routers.append((metrics.router(lambda: [*ctx.metrics(), *ledger.metric_families()]), ""))
    app.include_router(routers[-1][0])
    routers.append((dashboard.ui_router(), ""))
    app.include_router(routers[-1][0])

    readiness = Readiness(ctx.store, ctx.blobs, timeout=settings.ready_timeout_seconds)

    @app.get("/health", **openapi.HEALTH)
    async def health() -> Response:
        return JsonResponse({"status": "ok"})

    @app.get("/health/ready", **openapi.READY)
    async def ready() -> Response:
        return await readiness.response()

    openapi.install(app)
    # what a 405's `Allow` lists (see `errors.py`)
    paths = [(prefix + r.path, r.methods) for router, prefix in routers for r in router.routes]
    paths += [(r.path, r.methods) for r in app.router.routes if isinstance(r, APIRoute)]
    app.state.route_methods = route_methods(paths)
    return app
