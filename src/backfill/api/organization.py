"""`/v1/organization/usage/completions`, `/v1/organization/usage/embeddings` and
`/v1/organization/costs`: the usage ledger in the shape of OpenAI's Usage and Costs API.

Parameters are OpenAI's: `start_time` (required), `end_time` (exclusive; default: the end of
the current second, so work recorded just now counts), `bucket_width` (`1m`, `1h`, `1d`; costs
`1d` only), `project_ids`, `api_key_ids`, `models`, `batch` (completions), `group_by`, `limit`
(buckets a page; defaults and maxima per width as the spec gives them) and `page` (the previous
answer's `next_page`). List parameters are accepted repeated both as `name=` and `name[]=`.
The answer is a page of buckets, every bucket of the range included, empty or not
(`domain/usage_reports.py` says where buckets start, what each report counts and what a cost
`line_item` is).

Who sees what: an admin key (`backfill keys create --admin`) sees every project and may filter
with `project_ids`. A project key sees its own project only: its filter is forced, and
`project_ids` naming only other projects give empty buckets, as if they had no usage (no 403:
the key learns nothing about which projects exist).

Not reported: users (`user_id` is accepted in `group_by` and always null: backfill has keys,
not users), service tiers and `api_source` (null likewise), audio tokens (always 0). Costs add
an extension to OpenAI's result: `list_amount`, the same work at the real-time price (equal to
`amount` for real-time work; twice it for batch work at the default 50% discount).
"""

from collections.abc import Sequence
from typing import Annotated, Any, Literal, get_args

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel
from starlette.responses import Response

from backfill.api.auth import Authenticator
from backfill.api.context import ApiContext
from backfill.api.responses import JsonResponse, call
from backfill.domain.pricing import micros_to_amount
from backfill.domain.records import Project
from backfill.domain.usage_reports import (
    COMPLETIONS_ENDPOINTS,
    COST_LIMITS,
    EMBEDDINGS_ENDPOINTS,
    MAX_TIME,
    USAGE_LIMITS,
    WIDTHS,
    UsageTotal,
    bucket_starts,
    decode_page,
    encode_page,
    line_item,
)
from backfill.errors import InvalidRequest

CompletionsGroup = Literal[
    "project_id", "user_id", "api_key_id", "model", "batch", "service_tier", "api_source"
]
EmbeddingsGroup = Literal["project_id", "user_id", "api_key_id", "model"]
CostsGroup = Literal["project_id", "user_id", "line_item", "api_key_id", "api_source"]
#: groups backfill has no data for: accepted, always null
_NULL_GROUPS = frozenset({"user_id", "service_tier", "api_source"})

# -- the wire format, for /openapi.json (OpenAI's UsageResponse, UsageTimeBucket, ...) -------


class UsageCompletionsResult(BaseModel):
    object: Literal["organization.usage.completions.result"]
    input_tokens: int
    output_tokens: int
    input_cached_tokens: int
    input_audio_tokens: int
    output_audio_tokens: int
    num_model_requests: int
    project_id: str | None
    user_id: str | None
    api_key_id: str | None
    model: str | None
    batch: bool | None
    service_tier: str | None


class UsageEmbeddingsResult(BaseModel):
    object: Literal["organization.usage.embeddings.result"]
    input_tokens: int
    num_model_requests: int
    project_id: str | None
    user_id: str | None
    api_key_id: str | None
    model: str | None


class CostAmount(BaseModel):
    value: float
    currency: str


class CostsResult(BaseModel):
    object: Literal["organization.costs.result"]
    amount: CostAmount
    line_item: str | None
    project_id: str | None
    user_id: str | None
    api_key_id: str | None
    quantity: float | None
    quantity_unit: str | None
    #: extension: the same work at the real-time price
    list_amount: CostAmount


class UsageCompletionsBucket(BaseModel):
    object: Literal["bucket"]
    start_time: int
    end_time: int
    results: list[UsageCompletionsResult]


class UsageEmbeddingsBucket(BaseModel):
    object: Literal["bucket"]
    start_time: int
    end_time: int
    results: list[UsageEmbeddingsResult]


class CostsBucket(BaseModel):
    object: Literal["bucket"]
    start_time: int
    end_time: int
    results: list[CostsResult]


class UsageCompletionsPage(BaseModel):
    object: Literal["page"]
    data: list[UsageCompletionsBucket]
    has_more: bool
    next_page: str | None


class UsageEmbeddingsPage(BaseModel):
    object: Literal["page"]
    data: list[UsageEmbeddingsBucket]
    has_more: bool
    next_page: str | None


class CostsPage(BaseModel):
    object: Literal["page"]
    data: list[CostsBucket]
    has_more: bool
    next_page: str | None


def _doc(summary: str, ok: type[BaseModel], groups: tuple[str, ...]) -> dict[str, Any]:
    from backfill.api import openapi

    strings = {"type": "array", "items": {"type": "string"}}
    return {
        "summary": summary,
        "responses": {200: {"model": ok, "description": "OK"}} | openapi.errors_of(400),
        # plain arrays, as OpenAI's spec gives them (FastAPI writes `anyOf [array, null]`)
        "openapi_extra": {
            openapi.PARAMETER_SCHEMAS: {
                "project_ids": strings,
                "api_key_ids": strings,
                "models": strings,
                "group_by": {"type": "array", "items": {"type": "string", "enum": list(groups)}},
            }
        },
    }


# -- parameters ---------------------------------------------------------------------------------

Time = Annotated[int, Query(ge=0, le=MAX_TIME, description="Unix seconds")]
IdList = Annotated[list[str] | None, Query()]


def _listed(request: Request, name: str, given: Sequence[str] | None) -> list[str] | None:
    """`name=a&name=b` (FastAPI parsed it) and `name[]=a&name[]=b`, together."""
    values = [*(given or []), *request.query_params.getlist(f"{name}[]")]
    return values if given is not None or values else None


def _groups(request: Request, given: Sequence[str] | None, allowed: tuple[str, ...]) -> set[str]:
    groups = set(_listed(request, "group_by", given) or [])
    bad = sorted(groups - set(allowed))
    if bad:
        raise InvalidRequest(
            f"Invalid value for 'group_by': {bad[0]!r}. Supported: {', '.join(allowed)}.",
            param="group_by",
            code="invalid_group_by",
        )
    return groups


def _window(
    now: int,
    start: int,
    end: int | None,
    width_name: str,
    limit: int | None,
    page: str | None,
    limits: dict[str, tuple[int, int]],
) -> tuple[int, int, int, bool]:
    """(page start, page end, width, whether more pages follow) of one request."""
    width = WIDTHS[width_name]
    default, most = limits[width_name]
    if limit is None:
        limit = default
    if not 1 <= limit <= most:
        raise InvalidRequest(
            f"Invalid 'limit': with bucket_width={width_name} it must be between 1 and {most}.",
            param="limit",
            code="invalid_limit",
        )
    if end is None:
        # to the end of the current second: `end_time` is exclusive and the ledger counts in
        # whole seconds, so work recorded this second is in the answer
        end = max(start, int(now) + 1)
    elif end <= start:
        raise InvalidRequest(
            "Invalid 'end_time': it must be after 'start_time'.",
            param="end_time",
            code="invalid_end_time",
        )
    first = start
    if page is not None:
        first_or_none = decode_page(page)
        if first_or_none is None or not (
            start <= first_or_none < end and (first_or_none - start) % width == 0
        ):
            raise InvalidRequest(
                "Invalid 'page': pass the 'next_page' of a previous answer to the same query.",
                param="page",
                code="invalid_page",
            )
        first = first_or_none
    last = min(end, first + limit * width)
    return first, last, width, last < end


def _scope(project: Project, asked: list[str] | None) -> list[str] | None:
    """The projects a key may read: an admin key any (None: all), a project key its own."""
    if project.admin:
        return asked
    if asked is None or project.id in asked:
        return [project.id]
    return []


def _page(buckets: list[dict[str, Any]], more: bool, next_start: int) -> dict[str, Any]:
    return {
        "object": "page",
        "data": buckets,
        "has_more": more,
        "next_page": encode_page(next_start) if more else None,
    }


def _buckets(
    first: int, last: int, width: int, totals: list[UsageTotal], render: Any
) -> list[dict[str, Any]]:
    by_bucket: dict[int, list[dict[str, Any]]] = {}
    for t in totals:
        result = render(t)
        if result is not None:
            by_bucket.setdefault(t.bucket, []).append(result)
    return [
        {
            "object": "bucket",
            "start_time": b,
            "end_time": min(b + width, last),
            "results": by_bucket.get(b, []),
        }
        for b in bucket_starts(first, last, width)
    ]


def _completions_result(t: UsageTotal) -> dict[str, Any]:
    return {
        "object": "organization.usage.completions.result",
        "input_tokens": t.input_tokens,
        "output_tokens": t.output_tokens,
        "input_cached_tokens": t.cached_tokens,
        "input_audio_tokens": 0,
        "output_audio_tokens": 0,
        "num_model_requests": t.requests,
        "project_id": t.project_id,
        "user_id": None,
        "api_key_id": t.api_key_id,
        "model": t.model,
        "batch": t.batch,
        "service_tier": None,
    }


def _embeddings_result(t: UsageTotal) -> dict[str, Any]:
    return {
        "object": "organization.usage.embeddings.result",
        "input_tokens": t.input_tokens,
        "num_model_requests": t.requests,
        "project_id": t.project_id,
        "user_id": None,
        "api_key_id": t.api_key_id,
        "model": t.model,
    }


def _costs_result(by_line: bool):  # type: ignore[no-untyped-def]
    def render(t: UsageTotal) -> dict[str, Any] | None:
        if t.currency is None:  # an unpriced model costs nothing
            return None
        currency = t.currency.lower()
        return {
            "object": "organization.costs.result",
            "amount": {"value": micros_to_amount(t.cost_micros), "currency": currency},
            "line_item": line_item(t.model, t.batch) if by_line else None,
            "project_id": t.project_id,
            "user_id": None,
            "api_key_id": t.api_key_id,
            "quantity": t.input_tokens + t.output_tokens if by_line else None,
            "quantity_unit": "tokens" if by_line else None,
            "list_amount": {"value": micros_to_amount(t.list_micros), "currency": currency},
        }

    return render


# -- handlers -----------------------------------------------------------------------------------


def router(ctx: ApiContext, auth: Authenticator) -> APIRouter:
    r = APIRouter()
    CurrentProject = Annotated[Project, Depends(auth.require)]
    store = ctx.store

    async def usage_page(
        request: Request,
        project: Project,
        *,
        start: int,
        end: int | None,
        width_name: str,
        limit: int | None,
        page: str | None,
        limits: dict[str, tuple[int, int]],
        group_by: set[str],
        project_ids: list[str] | None,
        api_key_ids: list[str] | None,
        models: list[str] | None,
        endpoints: Sequence[str] | None,
        batch: bool | None,
        render: Any,
    ) -> Response:
        first, last, width, more = _window(ctx.now(), start, end, width_name, limit, page, limits)
        scope = _scope(project, project_ids)
        totals: list[UsageTotal] = []
        if first < last and scope != []:
            totals = await call(
                store.usage_totals,
                start=first,
                end=last,
                width=width,
                group_by=tuple(sorted(group_by - _NULL_GROUPS)),
                project_ids=scope,
                api_key_ids=api_key_ids,
                models=models,
                endpoints=endpoints,
                batch=batch,
            )
        return JsonResponse(_page(_buckets(first, last, width, totals, render), more, last))

    @r.get(
        "/organization/usage/completions",
        **_doc("Completions usage (chat completions, completions, responses)",
               UsageCompletionsPage, get_args(CompletionsGroup)),
    )  # fmt: skip
    async def usage_completions(
        request: Request,
        project: CurrentProject,
        start_time: Time,
        end_time: Annotated[int | None, Query(ge=0, le=MAX_TIME)] = None,
        bucket_width: Literal["1m", "1h", "1d"] = "1d",
        project_ids: IdList = None,
        api_key_ids: IdList = None,
        models: IdList = None,
        batch: bool | None = None,
        group_by: Annotated[list[CompletionsGroup] | None, Query()] = None,
        limit: Annotated[int | None, Query(ge=1, le=1440)] = None,
        page: str | None = None,
    ) -> Response:
        groups = _groups(request, group_by, get_args(CompletionsGroup))
        return await usage_page(
            request,
            project,
            start=start_time,
            end=end_time,
            width_name=bucket_width,
            limit=limit,
            page=page,
            limits=USAGE_LIMITS,
            group_by=groups,
            project_ids=_listed(request, "project_ids", project_ids),
            api_key_ids=_listed(request, "api_key_ids", api_key_ids),
            models=_listed(request, "models", models),
            endpoints=COMPLETIONS_ENDPOINTS,
            batch=batch,
            render=_completions_result,
        )

    @r.get(
        "/organization/usage/embeddings",
        **_doc("Embeddings usage (/v1/embeddings)", UsageEmbeddingsPage, get_args(EmbeddingsGroup)),
    )
    async def usage_embeddings(
        request: Request,
        project: CurrentProject,
        start_time: Time,
        end_time: Annotated[int | None, Query(ge=0, le=MAX_TIME)] = None,
        bucket_width: Literal["1m", "1h", "1d"] = "1d",
        project_ids: IdList = None,
        api_key_ids: IdList = None,
        models: IdList = None,
        group_by: Annotated[list[EmbeddingsGroup] | None, Query()] = None,
        limit: Annotated[int | None, Query(ge=1, le=1440)] = None,
        page: str | None = None,
    ) -> Response:
        groups = _groups(request, group_by, get_args(EmbeddingsGroup))
        return await usage_page(
            request,
            project,
            start=start_time,
            end=end_time,
            width_name=bucket_width,
            limit=limit,
            page=page,
            limits=USAGE_LIMITS,
            group_by=groups,
            project_ids=_listed(request, "project_ids", project_ids),
            api_key_ids=_listed(request, "api_key_ids", api_key_ids),
            models=_listed(request, "models", models),
            endpoints=EMBEDDINGS_ENDPOINTS,
            batch=None,
            render=_embeddings_result,
        )

    @r.get("/organization/costs", **_doc("Costs, per day", CostsPage, get_args(CostsGroup)))
    async def costs(
        request: Request,
        project: CurrentProject,
        start_time: Time,
        end_time: Annotated[int | None, Query(ge=0, le=MAX_TIME)] = None,
        bucket_width: Literal["1d"] = "1d",
        project_ids: IdList = None,
        api_key_ids: IdList = None,
        group_by: Annotated[list[CostsGroup] | None, Query()] = None,
        limit: Annotated[int | None, Query(ge=1, le=180)] = None,
        page: str | None = None,
    ) -> Response:
        groups = _groups(request, group_by, get_args(CostsGroup))
        by_line = "line_item" in groups
        store_groups = (groups - {"line_item"}) | {"currency"}
        if by_line:
            store_groups |= {"model", "batch"}
        return await usage_page(
            request,
            project,
            start=start_time,
            end=end_time,
            width_name=bucket_width,
            limit=limit,
            page=page,
            limits=COST_LIMITS,
            group_by=store_groups,
            project_ids=_listed(request, "project_ids", project_ids),
            api_key_ids=_listed(request, "api_key_ids", api_key_ids),
            models=None,
            endpoints=None,
            batch=None,
            render=_costs_result(by_line),
        )

    return r
