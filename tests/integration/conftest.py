"""One real upstream and one real `backfill serve` for the whole integration session.

The server is shared: tests that need exact lists (pagination, isolation) make their own
project with the real CLI (`backfill keys create`) instead of restarting anything. Limits are
set small through `BACKFILL_*` environment variables so the limit tests need only small files:
1 MiB uploads, 25 requests per batch, a 100,000-token quota; shards of 3 requests and quick
flushes/ticks keep each batch well under a second.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from openai import OpenAI
from suite_settings import CLI, KEY_A, MODELS, SERVER_ENV

from backfill.testing import UpstreamProcess, start_upstream
from backfill.testing.server import BackfillProcess


def create_key(data_dir: Path, project: str) -> str:
    """`backfill keys create --project P --data-dir D`; the key is the last word printed."""
    out = subprocess.run(
        [*CLI, "keys", "create", "--project", project, "--data-dir", str(data_dir)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert f"project {project}" in out.stdout, out.stdout + out.stderr
    return out.stdout.split()[-1]


def sdk(server: BackfillProcess, key: str) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key=key, max_retries=1, timeout=15.0)


@pytest.fixture(scope="session")
def upstream() -> Iterator[UpstreamProcess]:
    with start_upstream() as up:
        yield up


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("backfill-data")


@pytest.fixture(scope="session")
def key_b(data_dir: Path) -> str:
    """Project `other`'s key, made by the CLI before the server starts."""
    return create_key(data_dir, "other")


@pytest.fixture(scope="session")
def server(upstream: UpstreamProcess, data_dir: Path, key_b: str) -> Iterator[BackfillProcess]:
    proc = BackfillProcess(
        data_dir,
        api_keys=[KEY_A],
        models=[f"{name}={upstream.url}" for name in MODELS],
        env=SERVER_ENV,
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def client(server: BackfillProcess) -> OpenAI:
    """Project `default`."""
    return sdk(server, KEY_A)


@pytest.fixture(scope="session")
def client_b(server: BackfillProcess, key_b: str) -> OpenAI:
    """Project `other`."""
    return sdk(server, key_b)


@pytest.fixture(scope="session")
def new_project(server: BackfillProcess) -> Callable[[str], OpenAI]:
    """A client for a fresh project whose key the CLI makes while the server runs."""

    def make(name: str) -> OpenAI:
        return sdk(server, create_key(server.data_dir, name))

    return make


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """On failure, attach the tail of the server's log to the report."""
    report = yield
    server = getattr(item, "funcargs", {}).get("server")
    if report.failed and isinstance(server, BackfillProcess):
        report.sections.append(("backfill serve log", server.logs()))
    return report
