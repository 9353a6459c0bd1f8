"""Batches API in-process: create (and each synchronous error), idempotency, get, list, cancel,
and the `/v1/batch/jobs` aliases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_api_support import T0, Api, api_harness, assert_error

from backfill.domain.records import BatchError, Usage
from backfill.domain.statuses import BatchStatus

pytestmark = pytest.mark.anyio

ZERO_USAGE = {
    "input_tokens": 0,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 0,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 0,
}


async def body_for(api: Api, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "input_file_id": await api.file_id(),
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


async def test_create_returns_full_batch_object(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as api:
        body = await body_for(api, metadata={"job": "nightly"})
        r = await api.create_batch(**body)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json"
        batch = r.json()
        assert batch["id"].startswith("batch_")
        assert batch == {
            "id": batch["id"],
            "object": "batch",
            "endpoint": "/v1/chat/completions",
            "model": None,
            "errors": None,
            "input_file_id": body["input_file_id"],
            "completion_window": "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": T0,
            "in_progress_at": None,
            "expires_at": T0 + 86400,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "usage": ZERO_USAGE,
            "metadata": {"job": "nightly"},
            "estimated_completion_at": None,
            "warning": None,
            "cost": None,  # no price configured for the model
        }
        stored = api.store.get_batch(batch["id"], api.project.id)
        assert stored is not None and stored.status == BatchStatus.VALIDATING

        got = await api.client.get(f"/v1/batches/{batch['id']}", headers=api.headers)
        assert got.status_code == 200 and got.json() == batch


async def test_batch_object_reflects_progress_errors_and_usage(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as api:
        bid = await api.batch_id()
        api.store.transition(
            bid,
            [BatchStatus.VALIDATING],
            BatchStatus.FAILED,
            failed_at=T0 + 5,
            errors=[BatchError("duplicate_custom_id", "dup", "custom_id", 3)],
            usage=Usage(10, 2, 5, 1),
            total=4,
            completed=1,
            failed=2,
        )
        b = (await api.client.get(f"/v1/batches/{bid}", headers=api.headers)).json()
        assert b["status"] == "failed" and b["failed_at"] == T0 + 5
        assert b["errors"] == {
            "object": "list",
            "data": [
                {"code": "duplicate_custom_id", "message": "dup", "param": "custom_id", "line": 3}
            ],
        }
        assert b["request_counts"] == {"total": 4, "completed": 1, "failed": 2}
        assert b["usage"] == {
            "input_tokens": 10,
            "input_tokens_details": {"cached_tokens": 2},
            "output_tokens": 5,
            "output_tokens_details": {"reasoning_tokens": 1},
            "total_tokens": 15,
        }


@pytest.mark.parametrize("missing", ["input_file_id", "endpoint", "completion_window"])
async def test_missing_parameter(tmp_path: Path, missing: str) -> None:
    async with api_harness(tmp_path) as api:
        body = await body_for(api)
        del body[missing]
        err = assert_error(
            await api.create_batch(**body),
            400,
            param=missing,
            code="missing_required_parameter",
            type_="invalid_request_error",
        )
        assert missing in err["message"]
        assert api.store.list_batches(api.project.id).items == []


async def test_unknown_argument(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as api:
        body = await body_for(api, model="llama")
        err = assert_error(await api.create_batch(**body), 400, param="model")
        assert err["message"] == "Unrecognized request argument supplied: model"


@pytest.mark.parametrize(
    ("content", "param"),
    [(b"{nope", None), (b"[1, 2]", None), (b"", None), (b'"x"', None)],
)
async def test_body_not_a_json_object(tmp_path: Path, content: bytes, param: None) -> None:
    async with api_harness(tmp_path) as api:
        r = await api.client.post(
            "/v1/batches",
            headers={**api.headers, "content-type": "application/json"},
            content=content,
        )
        assert_error(r, 400, param=param)


async def test_wrong_types(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as api:
        for field, value in [
            ("completion_window", 24),
            ("endpoint", ["/v1/chat/completions"]),
            ("metadata", {"a": 1}),
            ("metadata", "x"),
            ("output_expires_after", {"anchor": "created_at", "seconds": "3600"}),
        ]:
            body = await body_for(api, **{field: value})
            assert_error(await api.create_batch(**body), 400, param=field)


async def test_body_without_json_content_type_is_accepted(tmp_path: Path) -> None:
    """`curl -d '{...}'` sends application/x-www-form-urlencoded; we parse the JSON anyway."""
    async with api_harness(tmp_path) as api:
        import orjson

        body = await body_for(api)
        r = await api.client.post(
            "/v1/batches",
            headers={**api.headers, "content-type": "application/x-www-form-urlencoded"},
            content=orjson.dumps(body),
        )
        assert r.status_code == 200, r.text


async def test_unknown_and_foreign_input_file_are_404(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as api:
        theirs = await api.file_id(headers=api.other_headers)
        for fid in (theirs, "file-unknown"):
            body = await body_for(api, input_file_id=fid)
            err = assert_error(await api.create_batch(**body), 404, param="input_file_id")
            assert err["message"] == f"No such File object: {fid}"


async def test_input_file_with_wrong_purpose(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as api:
        fid = await api.file_id(purpose="user_data")
        body = await body_for(api, input_file_id=fid)
        assert_error(
            await api.create_batch(**body), 400, param="input_file_id", code="invalid_file_purpose"
        )


@pytest.mark.parametrize(
    ("endpoint", "status", "code"),
    [
        ("/v1/embeddings", 200, None),
        ("/v1/completions", 200, None),
        # accepted endpoints that no model of the harness serves
        ("/v1/responses", 400, "unsupported_endpoint"),
        ("/v1/moderations", 400, "unsupported_endpoint"),
        ("/v1/images/generations", 400, "invalid_endpoint"),
        ("v1/chat/completions", 400, "invalid_endpoint"),
    ],
)
async def test_endpoints(tmp_path: Path, endpoint: str, status: int, code: str | None) -> None:
    async with api_harness(tmp_path) as api:
        r = await api.create_batch(**await body_for(api, endpoint=endpoint))
        if status == 200:
            assert r.status_code == 200, r.text
            assert r.json()["endpoint"] == endpoint
        else:
            err = assert_error(r, status, param="endpoint", code=code)
            if code == "unsupported_endpoint":
                assert f"No model configured on this server serves {endpoint}" in err["message"]
                assert "'endpoints'" in err["message"]


@pytest.mark.parametrize("endpoint", ["/v1/responses", "/v1/moderations"])
async def test_responses_and_moderations_are_accepted_where_a_model_serves_them(
    tmp_path: Path, endpoint: str
) -> None:
    async with api_harness(tmp_path) as api:
        api.ctx.models = {**api.ctx.models, "up": frozenset({endpoint})}
        r = await api.create_batch(**await body_for(api, endpoint=endpoint))
        assert r.status_code == 200, r.text
        assert r.json()["endpoint"] == endpoint


async def test_endpoint_not_served_by_any_model(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as api:
        api.ctx.models = {"llama": frozenset({"/v1/chat/completions"})}
        r = await api.create_batch(**await body_for(api, endpoint="/v1/embeddings"))
        err = assert_error(r, 400, param="endpoint", code="unsupported_endpoint")
        assert "/v1/embeddings" in err["message"]


@pytest.mark.parametrize(
    ("window", "ok", "seconds"),
    [
        ("24h", True, 86400),
        ("1h", True, 3600),
        ("90m", True, 5400),
        ("7d", True, 7 * 86400),
        ("59m", False, 0),
        ("8d", False, 0),
        ("soon", False, 0),
        ("", False, 0),
    ],
)
async def test_completion_window(tmp_path: Path, window: str, ok: bool, seconds: int) -> None:
    async with api_harness(tmp_path) as api:
        r = await api.create_batch(**await body_for(api, completion_window=window))
        if ok:
            assert r.status_code == 200, r.text
            assert r.json()["expires_at"] == T0 + seconds
            assert r.json()["completion_window"] == window
        else:
            assert_error(r, 400, param="completion_window", code="invalid_completion_window")


async def test_metadata_limits(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as api:
        ok = {f"k{i}": "v" * 512 for i in range(16)}
        ok["k" * 64] = ok.pop("k0")
        r = await api.create_batch(**await body_for(api, metadata=ok))
        assert r.status_code == 200, r.text
        assert r.json()["metadata"] == ok
        for bad in (
            {f"k{i}": "v" for i in range(17)},
            {"k" * 65: "v"},
            {"k": "v" * 513},
        ):
            r = await api.create_batch(**await body_for(api, metadata=bad))
            assert_error(r, 400, param="metadata", code="invalid_metadata")


async def test_output_expires_after(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as api:
        good = {"anchor": "created_at", "seconds": 7200}
        r = await api.create_batch(**await body_for(api, output_expires_after=good))
        assert r.status_code == 200, r.text
        stored = api.store.get_batch(r.json()["id"])
        assert stored is not None and stored.output_expires_after == 7200
        for bad in (
            {"anchor": "created_at", "seconds": 60},
            {"anchor": "completed_at", "seconds": 7200},
            {"seconds": 7200},
        ):
            r = await api.create_batch(**await body_for(api, output_expires_after=bad))
            assert_error(r, 400, param="output_expires_after")


async def test_idempotency_key(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as api:
        body = await body_for(api, metadata={"a": "1", "b": "2"})
        headers = {**api.headers, "idempotency-key": "job-42"}
        first = await api.create_batch(headers=headers, **body)
        assert first.status_code == 200, first.text
        # Same key and body (keys in another order): the same batch.
        reordered = dict(reversed(list(body.items())))
        again = await api.create_batch(headers=headers, **reordered)
        assert again.status_code == 200
        assert again.json() == first.json()
        # Same key, different body: 409, not retryable.
        changed = await api.create_batch(headers=headers, **{**body, "metadata": {"a": "2"}})
        assert_error(changed, 409)
        assert changed.headers["x-should-retry"] == "false"
        # Another project may use the same key.
        other_body = {**body, "input_file_id": await api.file_id(headers=api.other_headers)}
        other = await api.create_batch(
            headers={**api.other_headers, "idempotency-key": "job-42"}, **other_body
        )
        assert other.status_code == 200 and other.json()["id"] != first.json()["id"]
        # No key: always a new batch.
        plain = await api.create_batch(**body)
        assert plain.json()["id"] != first.json()["id"]
        assert len(api.store.list_batches(api.project.id).items) == 2


async def test_get_and_cancel_cross_project_is_404(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as api:
        bid = await api.batch_id()
        for method, path in [
            ("GET", f"/v1/batches/{bid}"),
            ("POST", f"/v1/batches/{bid}/cancel"),
            ("GET", f"/v1/batch/jobs/{bid}"),
        ]:
            r = await api.client.request(method, path, headers=api.other_headers)
            err = assert_error(r, 404, param="batch_id", type_="invalid_request_error")
            assert err["message"] == f"No such Batch object: {bid}"
            unknown = await api.client.request(
                method, path.replace(bid, "batch_nope"), headers=api.headers
            )
            assert_error(unknown, 404, param="batch_id", code=err["code"])
        stored = api.store.get_batch(bid)
        assert stored is not None and stored.status == BatchStatus.VALIDATING
        listed = await api.client.get("/v1/batches", headers=api.other_headers)
        assert listed.json()["data"] == []


async def test_list_pagination(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as api:
        ids = []
        for i in range(5):
            api.clock.now = T0 + i
            ids.append(await api.batch_id())
        newest_first = ids[::-1]
        r = await api.client.get("/v1/batches", headers=api.headers)
        body = r.json()
        assert body["object"] == "list"
        assert [b["id"] for b in body["data"]] == newest_first
        assert all(b["object"] == "batch" for b in body["data"])
        assert (body["first_id"], body["last_id"], body["has_more"]) == (ids[4], ids[0], False)

        seen: list[str] = []
        after = None
        while True:
            query = "?limit=2" + (f"&after={after}" if after else "")
            page = (await api.client.get(f"/v1/batches{query}", headers=api.headers)).json()
            seen += [b["id"] for b in page["data"]]
            assert page["has_more"] == (len(seen) < 5)
            if not page["has_more"]:
                break
            after = page["last_id"]
        assert seen == newest_first

        for bad in ("limit=0", "limit=101", "limit=ten"):
            r = await api.client.get(f"/v1/batches?{bad}", headers=api.headers)
            assert_error(r, 400, param="limit")
        r = await api.client.get("/v1/batches?limit=100", headers=api.headers)
        assert len(r.json()["data"]) == 5


async def test_cancel_semantics(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as api:
        bid = await api.batch_id()
        api.clock.now = T0 + 30
        r = await api.client.post(f"/v1/batches/{bid}/cancel", headers=api.headers)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "cancelling"
        assert r.json()["cancelling_at"] == T0 + 30
        # Cancelling again returns it unchanged.
        api.clock.now = T0 + 60
        again = await api.client.post(f"/v1/batches/{bid}/cancel", headers=api.headers)
        assert again.status_code == 200 and again.json() == r.json()
        # ... also once cancelled.
        api.store.transition(bid, [BatchStatus.CANCELLING], BatchStatus.CANCELLED, cancelled_at=1)
        done = await api.client.post(f"/v1/batches/{bid}/cancel", headers=api.headers)
        assert done.status_code == 200 and done.json()["status"] == "cancelled"

        # In progress and finalizing batches can be cancelled too.
        for status in (BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING):
            other = await api.batch_id()
            api.store.transition(other, [BatchStatus.VALIDATING], BatchStatus.IN_PROGRESS)
            if status is BatchStatus.FINALIZING:
                api.store.transition(other, [BatchStatus.IN_PROGRESS], status)
            r = await api.client.post(f"/v1/batches/{other}/cancel", headers=api.headers)
            assert r.status_code == 200 and r.json()["status"] == "cancelling"


@pytest.mark.parametrize("final", [BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED])
async def test_cancel_finished_batch_is_409_not_retryable(
    tmp_path: Path, final: BatchStatus
) -> None:
    async with api_harness(tmp_path) as api:
        bid = await api.batch_id()
        path = [BatchStatus.VALIDATING]
        if final == BatchStatus.COMPLETED:
            api.store.transition(bid, path, BatchStatus.IN_PROGRESS)
            api.store.transition(bid, [BatchStatus.IN_PROGRESS], BatchStatus.FINALIZING)
            path = [BatchStatus.FINALIZING]
        api.store.transition(bid, path, final)
        r = await api.client.post(f"/v1/batches/{bid}/cancel", headers=api.headers)
        err = assert_error(r, 409, param="batch_id", code="batch_not_cancellable")
        assert str(final) in err["message"]
        assert r.headers["x-should-retry"] == "false"
        stored = api.store.get_batch(bid)
        assert stored is not None and stored.status == final


async def test_batch_jobs_aliases(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as api:
        body = await body_for(api)
        created = await api.client.post("/v1/batch/jobs", headers=api.headers, json=body)
        assert created.status_code == 200, created.text
        bid = created.json()["id"]
        got = await api.client.get(f"/v1/batch/jobs/{bid}", headers=api.headers)
        assert got.json() == created.json()
        listed = await api.client.get("/v1/batch/jobs", headers=api.headers)
        assert [b["id"] for b in listed.json()["data"]] == [bid]
        cancelled = await api.client.post(f"/v1/batch/jobs/{bid}/cancel", headers=api.headers)
        assert cancelled.json()["status"] == "cancelling"
        same = await api.client.get(f"/v1/batches/{bid}", headers=api.headers)
        assert same.json()["status"] == "cancelling"


async def test_oversized_json_body_is_413(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as api:
        body = await body_for(api, metadata={"k": "v" * (2 << 20)})
        assert_error(await api.create_batch(**body), 413)
