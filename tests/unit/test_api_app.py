"""App-wide behaviour: auth, request ids, the error envelope for every kind of failure, models,
health."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_api_support import KEY, T0, api_harness, assert_error

from backfill.errors import RateLimited, StoreError

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"authorization": ""}, "missing_api_key"),
        ({"authorization": "Bearer sk-wrong-key-123456"}, "invalid_api_key"),
        ({"authorization": f"Basic {KEY}"}, "invalid_api_key"),
        ({"authorization": "Bearer"}, "invalid_api_key"),
    ],
)
async def test_auth_failures_are_401_envelopes(
    tmp_path: Path, headers: dict[str, str], code: str
) -> None:
    async with api_harness(tmp_path) as api:
        for method, path in [
            ("GET", "/v1/files"),
            ("POST", "/v1/files"),
            ("GET", "/v1/batches"),
            ("POST", "/v1/batches"),
            ("GET", "/v1/batches/batch_x"),
            ("GET", "/v1/models"),
        ]:
            r = await api.client.request(method, path, headers=headers)
            err = assert_error(r, 401, param=None, code=code, type_="authentication_error")
            assert r.headers["x-request-id"].startswith("req_")
            assert "sk-wrong-key-123456" not in err["message"]  # keys are redacted


async def test_key_with_sdk_headers_and_bearer_case(tmp_path: Path) -> None:
    sdk_headers = {
        "authorization": f"bearer {KEY}",
        "accept": "application/json",
        "user-agent": "OpenAI/Python 3.57.0",
        "openai-organization": "org-123",
        "openai-project": "proj_abc",
        "x-stainless-lang": "python",
        "x-stainless-retry-count": "0",
        "x-stainless-async": "false",
    }
    async with api_harness(tmp_path) as api:
        r = await api.client.get("/v1/batches", headers=sdk_headers)
        assert r.status_code == 200, r.text


async def test_auth_lookups_are_cached(tmp_path: Path, monkeypatch: Any) -> None:
    async with api_harness(tmp_path) as api:
        calls: list[str] = []
        original = api.store.project_for_key

        def counting(key_hash: str) -> Any:
            calls.append(key_hash)
            return original(key_hash)

        monkeypatch.setattr(api.store, "project_for_key", counting)
        for _ in range(5):
            assert (await api.client.get("/v1/batches", headers=api.headers)).status_code == 200
        assert len(calls) == 1
        for _ in range(2):
            r = await api.client.get("/v1/batches", headers={"authorization": "Bearer nope"})
            assert r.status_code == 401
        assert len(calls) == 3  # failures are never cached


async def test_health_needs_no_key(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as api:
        r = await api.client.get("/health")
        assert r.status_code == 200
        assert r.json() == {"status": "ok"}
        assert r.headers["content-type"] == "application/json"
        assert r.headers["x-request-id"].startswith("req_")


async def test_request_id_is_echoed_or_generated(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as api:
        r = await api.client.get("/health", headers={"x-request-id": "client-abc-1"})
        assert r.headers["x-request-id"] == "client-abc-1"
        a = await api.client.get("/health")
        b = await api.client.get("/health")
        assert a.headers["x-request-id"] != b.headers["x-request-id"]
        assert len(a.headers["x-request-id"]) == len("req_") + 32
        r = await api.client.get("/health", headers={"x-request-id": "x" * 500})
        assert r.headers["x-request-id"].startswith("req_")
        # On errors too.
        r = await api.client.get("/v1/files", headers={"x-request-id": "client-abc-2"})
        assert r.status_code == 401 and r.headers["x-request-id"] == "client-abc-2"


async def test_unknown_route_and_wrong_method(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as api:
        r = await api.client.get("/v1/nothing-here", headers=api.headers)
        err = assert_error(r, 404, param=None, code="unknown_url", type_="invalid_request_error")
        assert "/v1/nothing-here" in err["message"]
        r = await api.client.get("/nope")
        assert_error(r, 404, code="unknown_url")
        r = await api.client.put("/v1/batches", headers=api.headers)
        assert_error(r, 405, code="method_not_allowed")
        assert r.headers["allow"]


async def test_unexpected_exception_is_500_envelope_without_details(
    tmp_path: Path, monkeypatch: Any
) -> None:
    async with api_harness(tmp_path) as api:

        def boom(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("secret internal detail /etc/passwd")

        monkeypatch.setattr(api.store, "list_batches", boom)
        r = await api.client.get("/v1/batches", headers={**api.headers, "x-request-id": "rid-1"})
        err = assert_error(r, 500, param=None, code=None, type_="server_error")
        assert "secret" not in r.text
        assert r.headers["x-request-id"] == "rid-1"
        assert err["message"]


async def test_backfill_errors_map_to_status_and_headers(tmp_path: Path, monkeypatch: Any) -> None:
    async with api_harness(tmp_path) as api:

        def store_down(*args: Any, **kwargs: Any) -> Any:
            raise StoreError("metadata store failed: connection refused")

        def limited(*args: Any, **kwargs: Any) -> Any:
            raise RateLimited("Slow down.", retry_after=2.5)

        monkeypatch.setattr(api.store, "list_batches", store_down)
        r = await api.client.get("/v1/batches", headers=api.headers)
        assert_error(r, 500, type_="server_error")
        assert "connection refused" not in r.text  # backend details stay in the log
        assert "x-should-retry" not in r.headers  # worth retrying

        monkeypatch.setattr(api.store, "get_batch", limited)
        r = await api.client.get("/v1/batches/batch_x", headers=api.headers)
        assert_error(r, 429, type_="rate_limit_error", code="rate_limit_exceeded")
        assert r.headers["retry-after"] == "3"


async def test_models(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as api:
        r = await api.client.get("/v1/models", headers=api.headers)
        assert r.status_code == 200
        assert r.json() == {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": T0, "owned_by": "backfill"}
                for name in ("llama", "minilm", "org/model-7b")
            ],
        }
        r = await api.client.get("/v1/models/org/model-7b", headers=api.headers)
        assert r.status_code == 200 and r.json()["id"] == "org/model-7b"
        r = await api.client.get("/v1/models/gpt-5", headers=api.headers)
        assert_error(r, 404, param="model", code="model_not_found")
        assert_error(await api.client.get("/v1/models"), 401)


def test_store_outages_answered_to_clients_are_logged_once_without_tracebacks(
    caplog: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    from backfill.api import errors
    from backfill.api.errors import backfill_error_response
    from backfill.errors import StoreBusy

    monkeypatch.setattr(errors, "_outages", errors._OutageLog())  # no earlier test's window

    with caplog.at_level(logging.WARNING, logger="backfill.api"):
        for _ in range(50):
            response = backfill_error_response(StoreBusy("database is locked"))
            assert response.status_code == 503
        backfill_error_response(StoreError("metadata store failed: down"))
    records = [r for r in caplog.records if r.name == "backfill.api"]
    assert len(records) == 1
    assert records[0].exc_info is None
    assert "database is locked" in records[0].getMessage()
