"""Acceptance tests: the real `backfill` CLI in subprocesses, restarted, killed and configured.

Each test starts its own servers (they are stopped, killed or configured differently), so the
fixtures here are per test; only the upstream is shared. The SDK helpers are the integration
suite's (`tests/integration/sdk_helpers.py`), put on the path here rather than copied.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from backfill.testing import UpstreamProcess, start_upstream
from backfill.testing.server import BackfillProcess

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

#: small shards, quick ticks and flushes, short leases: a batch is done in well under a second
FAST_ENV = {
    "BACKFILL_SHARD_SIZE": "2",
    "BACKFILL_FLUSH_EVERY_SECONDS": "0.1",
    "BACKFILL_SCHEDULER_INTERVAL": "0.1",
    "BACKFILL_LEASE_SECONDS": "2",
    "BACKFILL_CANCEL_GRACE_SECONDS": "0.2",
}


@pytest.fixture(scope="session")
def upstream() -> Iterator[UpstreamProcess]:
    with start_upstream() as up:
        yield up


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """On failure, attach the logs of every backfill process the test started."""
    report = yield
    if report.failed:
        for proc in getattr(item, "backfill_processes", []):
            assert isinstance(proc, BackfillProcess)
            report.sections.append((f"backfill log ({proc.log_path.name})", proc.logs()))
    return report


@pytest.fixture
def servers(request: pytest.FixtureRequest) -> Iterator[list[BackfillProcess]]:
    """Register started processes here: they are stopped at teardown and logged on failure."""
    started: list[BackfillProcess] = []
    request.node.backfill_processes = started
    try:
        yield started
    finally:
        for proc in started:
            proc.stop()
