"""`/v1/webhook_endpoints`: a project's webhook endpoints, as OpenAI's API manages them.

The official SDK's `client.webhooks.create | retrieve | update | list | delete |
rotate_secret | test` work unchanged. backfill sends the batch events only
(`batch.completed`, `batch.failed`, `batch.expired`, `batch.cancelled`); asking for another
event type is a 400 that says so. The signing secret is shown once, when an endpoint is made
or its secret rotated (`signing_secret`), and as a hint afterwards. Endpoints from the config
file (source `config`) are listed like the others but changed only in the file.

`test` sends one signed `batch.completed` event for a batch id that does not exist
(`batch_test`), under a fresh `webhook-id`, and answers with the endpoint's status code; an
endpoint that gives no answer is a 502 (`webhook_unreachable`).

Anyone holding a project key can point the server at a URL of their choosing, as at OpenAI:
the server only ever POSTs the fixed event body there and never shows what came back beyond the
status code.
"""

import time
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr, ValidationError
from starlette.responses import Response

from backfill.api.auth import Authenticator
from backfill.api.batches import read_small_body
from backfill.api.context import ApiContext
from backfill.api.errors import validation_error
from backfill.api.responses import JsonResponse, call
from backfill.api.text import check_json_text
from backfill.domain.records import Project
from backfill.domain.webhooks import (
    EVENT_TYPES,
    WebhookEndpoint,
    check_event_types,
    check_url,
    new_event_id,
    new_secret,
)
from backfill.errors import Conflict, EngineError, InvalidRequest, NotFound
from backfill.webhooks.endpoints import make_endpoint

#: how long `rotate_secret` keeps the old secret signing when asked to
KEEP_OLD_SECRET_SECONDS = 24 * 3600
TEST_BATCH_ID = "batch_test"

EventType = Literal["batch.completed", "batch.failed", "batch.expired", "batch.cancelled"]


class CreateWebhookEndpointRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: StrictStr
    event_types: list[StrictStr]
    name: StrictStr = ""


class UpdateWebhookEndpointRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: StrictStr | None = None
    event_types: list[StrictStr] | None = None
    name: StrictStr | None = None


class RotateSecretRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keep_old_secret_active_for_24_hours: StrictBool = False


class TestWebhookEndpointRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    event_type: StrictStr


# -- the wire format, for /openapi.json -------------------------------------------------------


class WebhookEndpointObject(BaseModel):
    id: str
    object: Literal["webhook_endpoint"]
    name: str
    url: str
    event_types: list[EventType]
    created_at: int
    updated_at: int
    signing_secret_hint: str


class WebhookEndpointWithSecret(WebhookEndpointObject):
    signing_secret: str


class WebhookEndpointList(BaseModel):
    object: Literal["list"]
    data: list[WebhookEndpointObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class WebhookEndpointDeleted(BaseModel):
    id: str
    object: Literal["webhook_endpoint.deleted"]
    deleted: bool


class WebhookEndpointTestResult(BaseModel):
    object: Literal["webhook_endpoint.test"]
    webhook_endpoint_id: str
    event_type: str
    status_code: int
    success: bool


def _doc(
    summary: str, ok: type[BaseModel], *errors: int, body: type[BaseModel] | None = None
) -> dict[str, Any]:
    """The route's /openapi.json keywords (as `api/openapi.py` gives the other routes)."""
    from backfill.api import openapi

    doc: dict[str, Any] = {
        "summary": summary,
        "responses": {200: {"model": ok, "description": "OK"}} | openapi.errors_of(*errors),
    }
    if body is not None:
        doc["openapi_extra"] = openapi.json_body(body.__name__)
    return doc


SCHEMAS: tuple[type[BaseModel], ...] = (
    CreateWebhookEndpointRequest,
    UpdateWebhookEndpointRequest,
    RotateSecretRequest,
    TestWebhookEndpointRequest,
)


# -- handlers ---------------------------------------------------------------------------------


def _parse(model: type[BaseModel], raw: bytes, *, empty_ok: bool = False) -> Any:
    try:
        data = orjson.loads(raw) if raw.strip() else ({} if empty_ok else None)
    except orjson.JSONDecodeError:
        raise validation_error([{"type": "json_invalid", "loc": ("body",)}]) from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_request_body")
    for name, value in data.items():
        check_json_text(value, name)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        raise validation_error([{**e, "loc": ("body", *e["loc"])} for e in errors]) from None


def _events(types: list[str]) -> tuple[str, ...]:
    try:
        return check_event_types(types)
    except ValueError:
        raise InvalidRequest(
            f"Invalid 'event_types': backfill sends the batch events only "
            f"({', '.join(EVENT_TYPES)}), at least one of them.",
            param="event_types",
            code="invalid_event_types",
        ) from None


def _url(url: str) -> str:
    try:
        return check_url(url)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="url", code="invalid_url") from None


def _not_found(endpoint_id: str) -> NotFound:
    return NotFound(f"No such webhook endpoint: {endpoint_id}", param="webhook_endpoint_id")


def _from_config(endpoint: WebhookEndpoint) -> None:
    if endpoint.source == "config":
        raise Conflict(
            f"Webhook endpoint {endpoint.id} comes from the server's config file; change it there.",
            param="webhook_endpoint_id",
            code="endpoint_from_config",
        )


def router(ctx: ApiContext, auth: Authenticator) -> APIRouter:
    from backfill.webhooks.deliverer import client_session, send

    r = APIRouter()
    CurrentProject = Annotated[Project, Depends(auth.require)]
    store = ctx.store
    timeout = ctx.settings.webhook_timeout_seconds

    async def own(project: Project, endpoint_id: str) -> WebhookEndpoint:
        found = await call(store.get_webhook_endpoint, endpoint_id, project.id)
        if found is None:
            raise _not_found(endpoint_id)
        return found

    @r.post(
        "/webhook_endpoints",
        **_doc("Create a webhook endpoint", WebhookEndpointWithSecret, 400,
               body=CreateWebhookEndpointRequest),
    )  # fmt: skip
    async def create(request: Request, project: CurrentProject) -> Response:
        body = _parse(CreateWebhookEndpointRequest, await read_small_body(request))
        endpoint = make_endpoint(
            project.id,
            _url(body.url),
            int(ctx.now()),
            events=_events(body.event_types),
            name=body.name,
        )
        await call(store.add_webhook_endpoint, endpoint)
        return JsonResponse(endpoint.to_dict(with_secret=True))

    @r.get("/webhook_endpoints", **_doc("List webhook endpoints, newest first",
                                        WebhookEndpointList, 400))  # fmt: skip
    async def list_endpoints(
        project: CurrentProject,
        after: str | None = None,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
    ) -> Response:
        every = list(reversed(await call(store.webhook_endpoints, project.id)))
        if after is not None:
            ids = [e.id for e in every]
            every = every[ids.index(after) + 1 :] if after in ids else []
        page = [e.to_dict() for e in every[:limit]]
        return JsonResponse(
            {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(every) > limit,
            }
        )

    @r.get("/webhook_endpoints/{webhook_endpoint_id}",
           **_doc("Retrieve a webhook endpoint", WebhookEndpointObject, 404))  # fmt: skip
    async def retrieve(webhook_endpoint_id: str, project: CurrentProject) -> Response:
        return JsonResponse((await own(project, webhook_endpoint_id)).to_dict())

    @r.post(
        "/webhook_endpoints/{webhook_endpoint_id}",
        **_doc("Update a webhook endpoint", WebhookEndpointObject, 400, 404, 409,
               body=UpdateWebhookEndpointRequest),
    )  # fmt: skip
    async def update(
        webhook_endpoint_id: str, request: Request, project: CurrentProject
    ) -> Response:
        body = _parse(UpdateWebhookEndpointRequest, await read_small_body(request), empty_ok=True)
        _from_config(await own(project, webhook_endpoint_id))
        changed = await call(
            store.update_webhook_endpoint,
            webhook_endpoint_id,
            int(ctx.now()),
            project.id,
            url=None if body.url is None else _url(body.url),
            name=body.name,
            event_types=None if body.event_types is None else _events(body.event_types),
        )
        if changed is None:
            raise _not_found(webhook_endpoint_id)
        return JsonResponse(changed.to_dict())

    @r.delete("/webhook_endpoints/{webhook_endpoint_id}",
              **_doc("Delete a webhook endpoint", WebhookEndpointDeleted, 404, 409))  # fmt: skip
    async def delete(webhook_endpoint_id: str, project: CurrentProject) -> Response:
        _from_config(await own(project, webhook_endpoint_id))
        gone = await call(
            store.remove_webhook_endpoint, webhook_endpoint_id, int(ctx.now()), project.id
        )
        if gone is None:
            raise _not_found(webhook_endpoint_id)
        return JsonResponse(
            {"id": webhook_endpoint_id, "object": "webhook_endpoint.deleted", "deleted": True}
        )

    @r.post(
        "/webhook_endpoints/{webhook_endpoint_id}/rotate_secret",
        **_doc("Rotate a webhook endpoint's signing secret", WebhookEndpointWithSecret, 400,
               404, 409, body=RotateSecretRequest),
    )  # fmt: skip
    async def rotate_secret(
        webhook_endpoint_id: str, request: Request, project: CurrentProject
    ) -> Response:
        body = _parse(RotateSecretRequest, await read_small_body(request), empty_ok=True)
        old = await own(project, webhook_endpoint_id)
        _from_config(old)
        now = int(ctx.now())
        keep = body.keep_old_secret_active_for_24_hours
        changed = await call(
            store.update_webhook_endpoint,
            webhook_endpoint_id,
            now,
            project.id,
            secret=new_secret(),
            previous_secret=old.secret if keep else "",
            previous_secret_until=now + KEEP_OLD_SECRET_SECONDS if keep else 0,
        )
        if changed is None:
            raise _not_found(webhook_endpoint_id)
        return JsonResponse(changed.to_dict(with_secret=True))

    @r.post(
        "/webhook_endpoints/{webhook_endpoint_id}/test",
        **_doc("Send a test event to a webhook endpoint", WebhookEndpointTestResult, 400, 404,
               502, body=TestWebhookEndpointRequest),
    )  # fmt: skip
    async def test(webhook_endpoint_id: str, request: Request, project: CurrentProject) -> Response:
        body = _parse(TestWebhookEndpointRequest, await read_small_body(request))
        [event_type] = _events([body.event_type])
        endpoint = await own(project, webhook_endpoint_id)
        event_id = new_event_id()
        event = {
            "id": event_id,
            "object": "event",
            "type": event_type,
            "created_at": int(time.time()),
            "data": {"id": TEST_BATCH_ID},
        }
        async with client_session(timeout) as session:
            status, error = await send(
                session, endpoint.url, endpoint.secrets_at(time.time()), event_id, event
            )
        if status is None:
            raise EngineError(
                f"The webhook endpoint gave no answer: {error}", code="webhook_unreachable"
            )
        return JsonResponse(
            {
                "object": "webhook_endpoint.test",
                "webhook_endpoint_id": endpoint.id,
                "event_type": event_type,
                "status_code": status,
                "success": True,
            }
        )

    return r
