"""The dashboard in a real browser: sign in, watch a batch's progress move, cancel from the
page, errors grouped by code, the models page. Screenshots of each page are saved (see
`conftest.py`)."""

from __future__ import annotations

import re
from pathlib import Path

from browser_settings import KEY, LIMIT, MODEL
from openai import OpenAI
from playwright.sync_api import Page, expect
from polling import poll
from sdk_helpers import chat_line, submit

WAIT_MS = 20_000
TITLE = re.compile(r"(\d+) completed, (\d+) failed")


def lines(prefix: str, n: int, directive: str) -> list[dict[str, object]]:
    return [chat_line(f"{prefix}-{i}", f"hello {i} {directive}", model=MODEL) for i in range(n)]


def sign_in(page: Page, ui: str, key: str = KEY) -> None:
    page.goto(ui)
    page.fill("#api-key", key)
    page.click("#sign-in-form button[type=submit]")


def done_of(page: Page, selector: str) -> tuple[int, int] | None:
    """`done / total` as the progress text under `selector` shows it (None: not shown)."""
    text = page.text_content(f"{selector} .progress-text", timeout=WAIT_MS) or ""
    m = re.fullmatch(r"\s*([\d,]+) / ([\d,]+)\s*", text)
    return (int(m[1].replace(",", "")), int(m[2].replace(",", ""))) if m else None


def drawn(page: Page) -> int:
    """Requests the throughput chart's bars account for."""
    titles = page.locator("svg.chart rect.bar > title").all_text_contents()
    return sum(int(m[1]) + int(m[2]) for t in titles if (m := TITLE.search(t)))


def test_sign_in_refuses_a_wrong_key_with_the_api_message(page: Page, ui: str) -> None:
    sign_in(page, ui, "sk-wrong-key")
    expect(page.locator("#sign-in-error")).to_contain_text("Incorrect API key", timeout=WAIT_MS)
    expect(page.locator("#nav")).to_be_hidden()
    sign_in(page, ui)
    expect(page.locator("#nav")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#page h1")).to_have_text("Batches")
    # the key lives in this tab's sessionStorage only
    assert page.evaluate("sessionStorage.getItem('backfill.apiKey')") == KEY
    assert page.evaluate("localStorage.length") == 0


def test_progress_moves_and_the_chart_comes_from_the_server(
    page: Page, ui: str, client: OpenAI, shots: Path
) -> None:
    batch = submit(client, lines("run", 80, "#sleep:200"), metadata={"name": "nightly eval"})
    sign_in(page, ui)
    row = f"tr[data-batch='{batch.id}']"
    first = poll(
        lambda: done_of(page, row),
        lambda d: d is not None and 0 < d[0] < d[1],
        what="the batches page to show the batch part done",
        timeout=30,
    )
    assert first is not None
    poll(
        lambda: done_of(page, row),
        lambda d: d is not None and d[0] > first[0],
        what="the progress on the batches page to move",
        timeout=30,
    )
    expect(page.locator(f"{row} button[data-cancel]")).to_be_visible()
    page.screenshot(path=str(shots / "batches.png"), full_page=True)

    page.click(f"{row} a")
    expect(page.locator("#page h1")).to_contain_text(batch.id, timeout=WAIT_MS)
    poll(lambda: drawn(page), what="the throughput chart to draw a bar", timeout=30)
    # the series survives a reload: it is the server's, not the page's memory
    page.reload()
    poll(lambda: drawn(page), what="the throughput chart to draw a bar again", timeout=30)
    poll(
        lambda: done_of(page, ".facts"),
        lambda d: d is not None and d[0] >= d[1] // 4,
        what="the batch page to show a quarter of the batch done",
        timeout=30,
    )
    page.screenshot(path=str(shots / "batch.png"), full_page=True)
    client.batches.cancel(batch.id)  # leave the model's slots to the other tests


def test_cancel_from_the_page(page: Page, ui: str, client: OpenAI) -> None:
    batch = submit(client, lines("long", 200, "#sleep:200"))
    sign_in(page, ui)
    button = page.locator(f"tr[data-batch='{batch.id}'] button[data-cancel]")
    button.click(timeout=WAIT_MS)
    ended = poll(
        lambda: client.batches.retrieve(batch.id),
        lambda b: b.status == "cancelled",
        what="the batch to end cancelled",
        timeout=30,
    )
    assert ended.request_counts is not None and ended.request_counts.completed < 200
    row = page.locator(f"tr[data-batch='{batch.id}']")
    expect(row.locator(".status")).to_have_text("cancelled", timeout=WAIT_MS)
    expect(row.locator("button[data-cancel]")).to_have_count(0)


def test_errors_grouped_by_code(page: Page, ui: str, client: OpenAI, shots: Path) -> None:
    mixed = lines("ok", 6, "#sleep:10") + lines("long", 4, "#fail400") + lines("html", 3, "#html")
    batch = submit(client, mixed, metadata={"name": "<b>not bold</b>"})
    poll(
        lambda: client.batches.retrieve(batch.id),
        lambda b: b.status == "completed",
        what="the mixed batch to complete",
        timeout=40,
    )
    sign_in(page, ui)
    page.goto(f"{ui}#/batch/{batch.id}")
    errors = page.locator("#errors")
    expect(errors.locator("tr[data-code='context_length_exceeded'] td.num")).to_have_text(
        "4", timeout=WAIT_MS
    )
    expect(errors.locator("tr[data-code='invalid_upstream_response'] td.num")).to_have_text("3")
    expect(errors).to_contain_text("long-")
    # downloads carry the key: the error file arrives as a file
    with page.expect_download() as info:
        page.click("button[data-download='error']")
    assert info.value.path().read_bytes().count(b"\n") == 7
    page.screenshot(path=str(shots / "errors.png"), full_page=True)
    # metadata is shown as text, never as markup
    page.goto(f"{ui}#/batches")
    row = page.locator(f"tr[data-batch='{batch.id}']")
    expect(row).to_contain_text("<b>not bold</b>", timeout=WAIT_MS)
    expect(row.locator("b")).to_have_count(0)


def test_models_page_shows_the_limit(page: Page, ui: str, shots: Path) -> None:
    sign_in(page, ui)
    expect(page.locator("#nav")).to_be_visible(timeout=WAIT_MS)
    page.click("#nav a[data-page='models']")
    card = page.locator(f".model[data-model='{MODEL}']")
    expect(card.locator("dd[data-field='limit']")).to_have_text(str(LIMIT), timeout=WAIT_MS)
    expect(card.locator("dd[data-field='governor']")).to_contain_text("dormant")
    page.screenshot(path=str(shots / "models.png"), full_page=True)
