"""Fuzz every operation of `/openapi.json` with schemathesis against a real `backfill serve`.

A real server on a real port (with the echo upstream behind two models), driven by
schemathesis's pytest integration: for each operation it sends schema-valid and schema-invalid
requests (with the key) and checks that no answer is a 5xx and that every answer matches the
document: a documented status, content type, headers and body schema. Bounded: a few examples
per operation and an overall time budget, after which the remaining cases are not sent.
Derandomized: every run sends the same cases (CI must not fail on a new random draw; run it with
`derandomize=False` locally to explore).

The document is built in-process when the module is collected (no server runs then), and the
first test checks that the server's `/openapi.json` is exactly that document. (schemathesis's
`from_fixture`, which would load it from the running server, fails on pytest 9.2: it reads
`Function._nodeid`, which pytest no longer has.)

Checks: schemathesis's defaults, except `positive_data_acceptance`, which requires a 2xx or
404 for every schema-valid request. Whether a request succeeds here depends on server state and
on checks a schema cannot state (an `input_file_id` must name an uploaded `batch` file, a
completion window must lie within the configured range, a real-time `model` must be served),
so schema-valid requests are rightly answered 400. Nothing else is excluded: no operation, no
check.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings

from backfill.api.app import create_app
from backfill.api.context import ApiContext
from backfill.blobs.obstore_blobs import open_blobs
from backfill.settings import Settings
from backfill.store.memory import MemoryStore
from backfill.testing import UpstreamProcess, start_upstream
from backfill.testing.server import BackfillProcess

KEY = "sk-fuzz"
MAX_EXAMPLES = 25
BUDGET_SECONDS = 180.0
_deadline: list[float] = []


def served_document() -> dict[str, Any]:
    """What `GET /openapi.json` answers: it depends only on the code, not on the server."""
    settings = Settings(default_model=False, run_worker=False, run_scheduler=False)
    blobs = open_blobs("memory://", Path("."))
    app = create_app(ApiContext(settings=settings, store=MemoryStore(), blobs=blobs))
    return app.openapi()


DOCUMENT = served_document()
schema = schemathesis.openapi.from_dict(
    DOCUMENT,
    config=schemathesis.Config.from_dict(
        {
            "headers": {"Authorization": f"Bearer {KEY}"},
            "generation": {"max-examples": MAX_EXAMPLES},
            "checks": {"positive_data_acceptance": {"enabled": False}},
        }
    ),
)


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamProcess]:
    with start_upstream() as up:
        yield up


@pytest.fixture(scope="module")
def fuzzed_server(
    upstream: UpstreamProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BackfillProcess]:
    with BackfillProcess(
        tmp_path_factory.mktemp("fuzz") / "data",
        api_keys=[KEY],
        models=[f"{name}={upstream.url}" for name in ("m", "m2")],
        env={
            "BACKFILL_MAX_UPLOAD_BYTES": str(1 << 20),
            # the `ignored_auth` check sends wrong keys from one address on purpose, far more
            # than the failed-key limit allows; that limit has its own test
            # (tests/integration/test_http_limits.py)
            "BACKFILL_AUTH_FAILURE_LIMIT": "0",
        },
    ) as proc:
        yield proc


@pytest.fixture(scope="module")
def root(fuzzed_server: BackfillProcess) -> str:
    return f"http://{fuzzed_server.host}:{fuzzed_server.port}"


def test_the_server_serves_the_fuzzed_document(root: str) -> None:
    resp = requests.get(f"{root}/openapi.json", timeout=30)
    assert resp.status_code == 200
    assert resp.json() == DOCUMENT


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    # the same cases on every run, so CI is reproducible: a random run once sent
    # `expires_after[seconds]` mutated into an empty array, which multipart encodes as no field
    # at all (a valid upload) and schemathesis then reported as accepted invalid data
    derandomize=True,
    database=None,
)
def test_api_matches_its_openapi_document(case: schemathesis.Case, root: str) -> None:
    if not _deadline:
        _deadline.append(time.monotonic() + BUDGET_SECONDS)
    if time.monotonic() > _deadline[0]:
        return  # over the budget: the rest of the run sends nothing
    case.call_and_validate(base_url=root, timeout=30)
