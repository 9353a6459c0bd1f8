"""The dashboard's JSON extensions in-process (throughput series, errors by code, models view)
and its files at `/ui`."""

from __future__ import annotations

import itertools
from pathlib import Path

import orjson
import pytest
from test_api_support import Api, api_harness, assert_error
from test_finalize_streaming import answer, build, failure, finish, request

from backfill.api.context import Latency, ModelLoad
from backfill.api.dashboard import MAX_MESSAGE, classify_error_line
from backfill.domain.records import BatchError, BatchRecord
from backfill.domain.results import ERROR, OUTPUT
from backfill.domain.statuses import BatchStatus

pytestmark = pytest.mark.anyio


UI_FOLDER = Path(__file__).parents[2] / "src" / "backfill" / "api" / "ui"


def rejected(cid: str, code: str = "context_length_exceeded") -> bytes:
    """An error-file line of a request the engine answered 400."""
    body = {"error": {"message": f"too long: {cid}", "type": "invalid_request_error", "code": code}}
    response = {"status_code": 400, "request_id": "r", "body": body}
    return orjson.dumps({"id": "batch_req_" + cid, "custom_id": cid, "response": response})


async def running_batch(api: Api) -> BatchRecord:
    """Two shards, three segments: 5 completed, 4 failed (2 rejected, 2 without an answer)."""
    lines = [request(f"c{n}") for n in range(1, 10)]
    segments = {
        0: [
            [(1, OUTPUT, answer("c1")), (2, ERROR, rejected("c2"))],
            [(3, OUTPUT, answer("c3")), (4, ERROR, failure("c4"))],
        ],
        1: [
            [
                (5, OUTPUT, answer("c5")),
                (6, ERROR, rejected("c6")),
                (7, OUTPUT, answer("c7")),
                (8, OUTPUT, answer("c8")),
                (9, ERROR, failure("c9")),
            ]
        ],
    }
    return await build(api.store, api.blobs, api.project.id, [lines[:4], lines[4:]], segments)


async def test_throughput_counts_every_recorded_request_once(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as api:
        batch = await running_batch(api)
        r = await api.client.get(f"/v1/batches/{batch.id}/throughput", headers=api.headers)
        assert r.status_code == 200, r.text
        series = r.json()
        assert series["object"] == "batch.throughput"
        assert series["batch_id"] == batch.id and series["status"] == "in_progress"
        assert series["total"] == 9 and series["finished"] == 9
        points = series["points"]
        assert points, series
        assert sum(p["completed"] for p in points) == 5
        assert sum(p["failed"] for p in points) == 4
        starts = [p["start"] for p in points]
        assert starts == sorted(starts) and all(isinstance(s, int) for s in starts)
        assert all(b - a == series["interval"] for a, b in itertools.pairwise(starts))

        # an interval asked for is kept unless the series would have too many points
        r = await api.client.get(
            f"/v1/batches/{batch.id}/throughput?interval=3600", headers=api.headers
        )
        coarse = r.json()
        assert coarse["interval"] >= 3600
        assert sum(p["completed"] + p["failed"] for p in coarse["points"]) == 9

        # segments are removed once finalized: no series, the timestamps remain
        await finish(api.store, api.blobs, batch)
        r = await api.client.get(f"/v1/batches/{batch.id}/throughput", headers=api.headers)
        ended = r.json()
        assert ended["status"] == "completed" and ended["points"] == []
        assert ended["ended_at"] is not None


async def test_throughput_and_errors_are_scoped_and_checked(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as api:
        batch = await running_batch(api)
        for what in ("throughput", "errors"):
            url = f"/v1/batches/{batch.id}/{what}"
            assert_error(await api.client.get(url, headers=api.other_headers), 404)
            assert_error(await api.client.get(url), 401)
            missing = f"/v1/batches/batch_nope/{what}"
            assert_error(await api.client.get(missing, headers=api.headers), 404)
        bad = f"/v1/batches/{batch.id}/throughput?interval=0"
        assert_error(await api.client.get(bad, headers=api.headers), 400)
        bad = f"/v1/batches/{batch.id}/errors?examples=21"
        assert_error(await api.client.get(bad, headers=api.headers), 400)


async def test_errors_grouped_while_running_and_from_the_error_file(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as api:
        batch = await running_batch(api)
        url = f"/v1/batches/{batch.id}/errors?examples=1"
        r = await api.client.get(url, headers=api.headers)
        assert r.status_code == 200, r.text
        running = r.json()
        assert running["object"] == "batch.errors" and running["complete"] is False
        assert running["total"] == 4
        assert [(g["code"], g["count"]) for g in running["data"]] == [
            ("bad", 2),
            ("context_length_exceeded", 2),
        ]
        by_code = {g["code"]: g for g in running["data"]}
        assert by_code["context_length_exceeded"]["examples"] == [
            {"custom_id": "c2", "status_code": 400, "line": None, "message": "too long: c2"}
        ]
        assert by_code["bad"]["examples"] == [
            {"custom_id": "c4", "status_code": None, "line": None, "message": "no"}
        ]

        await finish(api.store, api.blobs, batch)
        r = await api.client.get(f"/v1/batches/{batch.id}/errors", headers=api.headers)
        final = r.json()
        assert final["complete"] is True and final["total"] == 4
        assert [len(g["examples"]) for g in final["data"]] == [2, 2]


async def test_errors_of_a_failed_batch_are_its_validation_errors(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as api:
        batch_id = await api.batch_id()
        problems = tuple(BatchError("invalid_json_line", f"line {n} bad", line=n) for n in (1, 2))
        moved = api.store.transition(
            batch_id, [BatchStatus.VALIDATING], BatchStatus.FAILED, errors=problems
        )
        assert moved is not None
        r = await api.client.get(f"/v1/batches/{batch_id}/errors", headers=api.headers)
        assert r.json()["data"] == [
            {
                "code": "invalid_json_line",
                "count": 2,
                "examples": [
                    {"custom_id": None, "status_code": None, "line": n, "message": f"line {n} bad"}
                    for n in (1, 2)
                ],
            }
        ]


def test_error_lines_are_classified_defensively() -> None:
    assert classify_error_line(b"not json")[0] == "unreadable_line"
    assert classify_error_line(b"[1, 2]")[0] == "unknown_error"
    plain = {"custom_id": "x", "response": {"status_code": 502, "body": "gateway"}}
    code, example = classify_error_line(orjson.dumps(plain))
    assert code == "http_502" and example["message"] == "gateway"
    huge = {"custom_id": "y", "error": {"code": "big", "message": "m" * 10_000}}
    code, example = classify_error_line(orjson.dumps(huge))
    assert code == "big" and len(example["message"]) == MAX_MESSAGE


async def test_models_view(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as api:
        r = await api.client.get("/v1/dashboard/models", headers=api.headers)
        assert r.status_code == 200, r.text
        # no load known (no dispatcher in this process): the models, with nulls
        assert [m["id"] for m in r.json()["data"]] == ["llama", "minilm", "org/model-7b"]
        assert all(m["batch"] is None and m["governor"] is None for m in r.json()["data"])

        load = ModelLoad(
            name="llama",
            batch_limit=12,
            batch_in_flight=3,
            batch_deferred=1,
            realtime_in_flight=2,
            realtime_requests=40,
            ttft=Latency(0.05, 0.2, 17),
            governor="reference",
            reference=4.5,
            engine_metrics=True,
        )
        api.ctx.model_loads = lambda: [load]
        r = await api.client.get("/v1/dashboard/models", headers=api.headers)
        llama = r.json()["data"][0]
        assert llama == {
            "id": "llama",
            "object": "model.load",
            "endpoints": ["/v1/chat/completions", "/v1/completions"],
            "batch": {"limit": 12, "in_flight": 3, "deferred": 1},
            "realtime": {
                "in_flight": 2,
                "requests": 40,
                "ttft_seconds": {"p50": 0.05, "p90": 0.2, "samples": 17},
                "tpot_seconds": None,
            },
            "governor": {"state": "reference", "reference": 4.5, "engine_metrics": True},
        }
        assert_error(await api.client.get("/v1/dashboard/models"), 401)


async def test_ui_files(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as api:
        r = await api.client.get("/ui")
        assert r.status_code == 307 and r.headers["location"] == "/ui/"
        r = await api.client.get("/ui/")
        assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert b'<script type="module" src="/ui/app.js">' in r.content
        r = await api.client.get("/ui/app.js")
        assert r.headers["content-type"] == "text/javascript; charset=utf-8"
        # no data ever goes into the page as markup
        scripts = sorted(p.name for p in UI_FOLDER.glob("*.js"))
        assert {"app.js", "usage.js", "dom.js"} <= set(scripts)
        for name in scripts:  # every script the page may load, not a list to keep up to date
            assert b".innerHTML" not in (await api.client.get(f"/ui/{name}")).content
        assert_error(await api.client.get("/ui/nope.js"), 404)
        assert "/ui/" not in (await api.client.get("/openapi.json")).text
