"""Browser tier: the dashboard at `/ui` in Debian's headless chromium, driven by Playwright,
against a real `backfill serve` subprocess and the echo upstream on loopback.

Skipped, with the reason, without Playwright's Python package or `/usr/bin/chromium` (the
tier never downloads a browser). One server and one browser serve the whole tier; each test
gets a fresh page. Screenshots go to `BACKFILL_SCREENSHOTS` (default: a pytest temp folder).

The model `slow` runs at most 2 batch requests at once (its ceiling; the governor is on but
dormant: no real-time traffic), and every line asks the echo upstream to wait a little
(`#sleep:MS`), so a batch runs for seconds and its progress can be watched moving. `slow` has a
price (`[prices.slow]`, batch work at the default 50% discount); `free`, the same echo, has
none, for the usage page's "no price".
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser_settings import FREE_MODEL, KEY, LIMIT, MODEL, PRICE_INPUT, PRICE_OUTPUT
from openai import OpenAI

from backfill.testing import UpstreamProcess, start_upstream
from backfill.testing.server import BackfillProcess

CHROMIUM = Path("/usr/bin/chromium")

try:
    from playwright.sync_api import Browser, Page, sync_playwright
except ImportError:  # pragma: no cover - the tier skips
    sync_playwright = None

if sync_playwright is None:
    pytest.skip("playwright (python) is not installed", allow_module_level=True)
if not CHROMIUM.exists() and shutil.which("chromium") is None:
    pytest.skip(f"{CHROMIUM} is not installed (Debian's chromium)", allow_module_level=True)

SERVER_ENV = {
    "BACKFILL_SHARD_SIZE": "10",
    "BACKFILL_FLUSH_EVERY_SECONDS": "0.2",
    "BACKFILL_SCHEDULER_INTERVAL": "0.1",
    "BACKFILL_LEASE_SECONDS": "3",
    "BACKFILL_CANCEL_GRACE_SECONDS": "0.3",
    "BACKFILL_DEFAULT_MODEL": "false",
}


@pytest.fixture(scope="session")
def upstream() -> Iterator[UpstreamProcess]:
    with start_upstream() as up:
        yield up


@pytest.fixture(scope="session")
def server(
    upstream: UpstreamProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BackfillProcess]:
    data_dir = tmp_path_factory.mktemp("browser-data")
    config = data_dir / "backfill.toml"
    config.write_text(
        f'[models.{MODEL}]\nurl = "{upstream.url}"\nmax_concurrency = {LIMIT}\nattempts = 1\n'
        f'[models.{FREE_MODEL}]\nurl = "{upstream.url}"\nmax_concurrency = 4\nattempts = 1\n'
        f'[prices.{MODEL}]\ninput = {PRICE_INPUT}\noutput = {PRICE_OUTPUT}\ncurrency = "USD"\n'
    )
    proc = BackfillProcess(
        data_dir, api_keys=[KEY], env=SERVER_ENV, extra_args=["--config", str(config)]
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def client(server: BackfillProcess) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key=KEY, max_retries=1, timeout=15.0)


# module scope, not session: while Playwright's sync API runs, its event loop is the running
# loop of the main thread, and the anyio tests collected after this tier could not start theirs
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert sync_playwright is not None
    executable = CHROMIUM if CHROMIUM.exists() else Path(shutil.which("chromium") or "")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(executable), headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Browser, server: BackfillProcess) -> Iterator[Page]:
    # en-US: numbers and amounts are read back from the page as that locale writes them
    context = browser.new_context(
        viewport={"width": 1280, "height": 900}, accept_downloads=True, locale="en-US"
    )
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture(scope="session")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = os.environ.get("BACKFILL_SCREENSHOTS")
    folder = Path(where) if where else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def ui(server: BackfillProcess) -> str:
    return f"http://{server.host}:{server.port}/ui/"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """On failure, attach the server's log."""
    report = yield
    if report.failed and "server" in getattr(item, "funcargs", {}):
        proc = item.funcargs["server"]
        assert isinstance(proc, BackfillProcess)
        report.sections.append((f"backfill log ({proc.log_path.name})", proc.logs()))
    return report
