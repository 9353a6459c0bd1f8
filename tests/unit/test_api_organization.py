"""The usage and cost reports (`api/organization.py`) in-process on the memory store: figures
worked out by hand, every answer checked against OpenAI's own schemas (a fixture copied from
the official spec), who sees what, paging, and OpenAI-shaped 400s."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from test_api_support import T0, Api, api_harness, assert_error

from backfill.domain.usage import BATCH, REALTIME, UsageEntry

pytestmark = pytest.mark.anyio

ADMIN_KEY = "sk-test-admin-5555555555"
H = 3600
D = T0 - T0 % 86400  # the UTC midnight before the fake clock's now
SPEC = json.loads((Path(__file__).parents[1] / "support" / "openai_usage_schemas.json").read_text())


def check_spec(body: dict[str, Any]) -> None:
    """`body` is a valid `UsageResponse` of OpenAI's spec."""
    schema = {**SPEC, "$ref": "#/components/schemas/UsageResponse"}
    jsonschema.Draft202012Validator(schema).validate(body)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    async with api_harness(tmp_path) as api:
        store = api.store
        store.add_api_key(
            api.project.id, hashlib.sha256(ADMIN_KEY.encode()).hexdigest(), T0, admin=True
        )
        alpha_key = next(k.id for k in store.list_api_keys("alpha") if not k.admin)
        entries = [
            # alpha batch chat, hour 0
            UsageEntry("e1", BATCH, api.project.id, "llama", "/v1/chat/completions", D + 100,
                       api_key_id=alpha_key, requests=2, input_tokens=100, cached_tokens=40,
                       output_tokens=30, cost_micros=500, list_micros=1000, currency="USD"),
            # beta real-time chat, hour 1
            UsageEntry("e2", REALTIME, api.other.id, "llama", "/v1/chat/completions",
                       D + H + 5, requests=1, input_tokens=10, output_tokens=20,
                       cost_micros=300, list_micros=300, currency="USD"),
            # alpha real-time responses of an unpriced model, hour 1
            UsageEntry("e3", REALTIME, api.project.id, "org/model-7b", "/v1/responses",
                       D + H + 50, requests=1, input_tokens=7, output_tokens=3),
            # alpha batch embeddings, hour 0
            UsageEntry("e4", BATCH, api.project.id, "minilm", "/v1/embeddings", D + 200,
                       requests=2, input_tokens=16, cost_micros=20, list_micros=40,
                       currency="USD"),
        ]  # fmt: skip
        for e in entries:
            assert store.record_usage(e)
        yield api


def admin() -> dict[str, str]:
    return {"authorization": f"Bearer {ADMIN_KEY}"}


async def get(api: Api, path: str, headers: dict[str, str] | None = None, **params: Any) -> Any:
    r = await api.client.get(f"/v1/organization/{path}", params=params, headers=headers)
    assert r.status_code == 200, r.text
    body = r.json()
    check_spec(body)
    return body


def figures(body: dict[str, Any], *fields: str) -> list[list[tuple[Any, ...]]]:
    return [[tuple(res[f] for f in fields) for res in b["results"]] for b in body["data"]]


async def test_completions_hour_buckets_by_hand(api: Api) -> None:
    body = await get(api, "usage/completions", admin(), start_time=D, end_time=D + 2 * H,
                     bucket_width="1h")  # fmt: skip
    assert [(b["start_time"], b["end_time"]) for b in body["data"]] == [
        (D, D + H),
        (D + H, D + 2 * H),
    ]
    # hour 0: e1 only (e4 is embeddings); hour 1: e2 + e3 = 17 in, 23 out, 2 requests
    assert figures(body, "input_tokens", "output_tokens", "input_cached_tokens",
                   "num_model_requests") == [[(100, 30, 40, 2)], [(17, 23, 0, 2)]]  # fmt: skip
    [[first]] = [b["results"] for b in body["data"][:1]]
    assert first["object"] == "organization.usage.completions.result"
    assert (first["input_audio_tokens"], first["output_audio_tokens"]) == (0, 0)
    assert (first["project_id"], first["model"], first["batch"], first["api_key_id"]) == (
        None, None, None, None,
    )  # fmt: skip
    assert (body["has_more"], body["next_page"]) == (False, None)


async def test_completions_grouped(api: Api) -> None:
    body = await get(api, "usage/completions", admin(), start_time=D, end_time=D + 2 * H,
                     bucket_width="1h", group_by=["project_id", "batch", "model"])  # fmt: skip
    a, b = api.project.id, api.other.id
    got = figures(body, "project_id", "batch", "model", "input_tokens", "num_model_requests")
    assert got == [
        [(a, True, "llama", 100, 2)],
        sorted([(a, False, "org/model-7b", 7, 1), (b, False, "llama", 10, 1)]),
    ]
    # `group_by[]=` and `batch=false` (real time only) and user_id (always null)
    r = await api.client.get(
        "/v1/organization/usage/completions",
        params={"start_time": D, "end_time": D + 2 * H, "bucket_width": "1h", "batch": "false",
                "group_by[]": ["api_key_id", "user_id"]},
        headers=admin(),
    )  # fmt: skip
    assert r.status_code == 200, r.text
    check_spec(r.json())
    assert figures(r.json(), "api_key_id", "user_id", "num_model_requests") == [
        [],
        [(None, None, 2)],
    ]


async def test_embeddings_and_default_end(api: Api) -> None:
    # recorded in the fake clock's current second: the default end must include it (end_time
    # is exclusive; an end of `now` left out the work of the last second and the CI run that
    # queried right after a batch ended saw no embeddings)
    assert api.store.record_usage(
        UsageEntry("e5", BATCH, api.project.id, "minilm", "/v1/embeddings", T0, requests=1,
                   input_tokens=4)
    )  # fmt: skip
    body = await get(api, "usage/embeddings", admin(), start_time=D)
    # default end: the end of now's second (the fake clock), so one day bucket cut there
    [bucket] = body["data"]
    assert (bucket["start_time"], bucket["end_time"]) == (D, T0 + 1)
    assert figures(body, "object", "input_tokens", "num_model_requests") == [
        [("organization.usage.embeddings.result", 20, 3)]
    ]


async def test_costs_by_line_item(api: Api) -> None:
    body = await get(api, "costs", admin(), start_time=D, end_time=D + 86400,
                     group_by=["line_item"])  # fmt: skip
    [bucket] = body["data"]
    got = sorted(
        (r["line_item"], r["amount"]["value"], r["amount"]["currency"], r["list_amount"]["value"],
         r["quantity"])
        for r in bucket["results"]
    )  # fmt: skip
    # e3's model has no price: not a cost
    assert got == [
        ("llama, batch", 0.0005, "usd", 0.001, 130),
        ("llama, realtime", 0.0003, "usd", 0.0003, 30),
        ("minilm, batch", 0.00002, "usd", 0.00004, 16),
    ]
    total = await get(api, "costs", admin(), start_time=D, end_time=D + 86400)
    [[result]] = [b["results"] for b in total["data"]]
    assert (result["amount"], result["list_amount"], result["line_item"]) == (
        {"value": 0.00082, "currency": "usd"},
        {"value": 0.00134, "currency": "usd"},
        None,
    )


async def test_a_project_key_sees_its_own_project(api: Api) -> None:
    params = {"start_time": D, "end_time": D + 2 * H, "bucket_width": "1h"}
    own = await get(api, "usage/completions", api.headers, **params)
    assert figures(own, "input_tokens", "num_model_requests") == [[(100, 2)], [(7, 1)]]
    beta = await get(api, "usage/completions", api.other_headers, **params)
    assert figures(beta, "input_tokens", "num_model_requests") == [[], [(10, 1)]]
    # naming another project gives nothing; naming its own among others gives its own
    other = await get(api, "usage/completions", api.headers, project_ids=[api.other.id], **params)
    assert [b["results"] for b in other["data"]] == [[], []]
    both = await get(api, "usage/completions", api.headers,
                     project_ids=[api.other.id, api.project.id], **params)  # fmt: skip
    assert figures(both, "input_tokens") == [[(100,)], [(7,)]]
    # an admin key filters by project
    only_beta = await get(api, "usage/completions", admin(), project_ids=[api.other.id], **params)
    assert figures(only_beta, "input_tokens") == [[], [(10,)]]


async def test_pages_of_buckets(api: Api) -> None:
    params = {"start_time": D, "end_time": D + 3 * H, "bucket_width": "1h", "limit": 2}
    first = await get(api, "usage/completions", admin(), **params)
    assert [b["start_time"] for b in first["data"]] == [D, D + H]
    assert first["has_more"] is True and first["next_page"].startswith("page_")
    second = await get(api, "usage/completions", admin(), page=first["next_page"], **params)
    assert [(b["start_time"], b["results"]) for b in second["data"]] == [(D + 2 * H, [])]
    assert (second["has_more"], second["next_page"]) == (False, None)


@pytest.mark.parametrize(
    ("path", "params", "param"),
    [
        ("usage/completions", {}, "start_time"),
        ("usage/completions", {"start_time": "soon"}, "start_time"),
        ("usage/completions", {"start_time": D, "bucket_width": "2h"}, "bucket_width"),
        ("usage/completions", {"start_time": D, "limit": 32}, "limit"),
        ("usage/completions", {"start_time": D, "bucket_width": "1h", "limit": 169}, "limit"),
        ("usage/completions", {"start_time": D, "limit": 0}, "limit"),
        ("usage/completions", {"start_time": D, "end_time": D}, "end_time"),
        ("usage/completions", {"start_time": D, "page": "page_bogus"}, "page"),
        ("usage/completions", {"start_time": D, "group_by": "line_item"}, "group_by"),
        ("usage/completions", {"start_time": D, "group_by[]": "size"}, "group_by"),
        ("usage/embeddings", {"start_time": D, "group_by": "batch"}, "group_by"),
        ("costs", {"start_time": D, "bucket_width": "1h"}, "bucket_width"),
        ("costs", {"start_time": D, "limit": 181}, "limit"),
        ("costs", {"start_time": -1}, "start_time"),
    ],
)
async def test_bad_parameters_are_400_with_param(
    api: Api, path: str, params: dict[str, Any], param: str
) -> None:
    r = await api.client.get(f"/v1/organization/{path}", params=params, headers=admin())
    assert_error(r, 400, param=param, type_="invalid_request_error")


async def test_a_key_is_required(api: Api) -> None:
    r = await api.client.get("/v1/organization/costs", params={"start_time": D})
    assert_error(r, 401)
