"""Acceptance tests: the real `backfill` CLI in subprocesses, restarted, killed and configured.

Each test starts its own servers (they are stopped, killed or configured differently), so the
fixtures here are per test; only the upstream is shared. The SDK helpers and `poll` are shared
with the integration tier (`tests/support/`, on the path through pytest's `pythonpath`).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from backfill.testing import UpstreamProcess, start_upstream
from backfill.testing.server import BackfillProcess


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
