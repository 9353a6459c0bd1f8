"""`/v1/models`: the models this server can run batches for, as OpenAI model objects.

The list comes from the composition root (`ApiContext.models`: public name -> endpoints), so
it shows what batches may name in `body.model`, not what the upstream engines call them.
Model names may contain slashes (`meta-llama/Llama-3.1-8B-Instruct`), hence the `:path` route.
"""

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from starlette.responses import Response

from backfill.api import openapi
from backfill.api.auth import Authenticator
from backfill.api.context import ApiContext
from backfill.api.responses import JsonResponse
from backfill.domain.records import Project
from backfill.errors import NotFound


def model_object(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "backfill"}


def served_model(ctx: ApiContext, model_id: str) -> str:
    """`model_id` if batches may name it, else 404."""
    if model_id not in ctx.models:
        raise NotFound(
            f"The model '{model_id}' does not exist", param="model", code="model_not_found"
        )
    return model_id


def router(ctx: ApiContext, auth: Authenticator) -> APIRouter:
    r = APIRouter()
    CurrentProject = Annotated[Project, Depends(auth.require)]
    created = ctx.now()

    @r.get("/models", **openapi.LIST_MODELS)
    async def list_models(project: CurrentProject) -> Response:
        data = [model_object(name, created) for name in sorted(ctx.models)]
        return JsonResponse({"object": "list", "data": data})

    @r.get("/models/{model_id:path}", **openapi.RETRIEVE_MODEL)
    async def retrieve_model(model_id: str, project: CurrentProject) -> Response:
        return JsonResponse(model_object(served_model(ctx, model_id), created))

    return r
