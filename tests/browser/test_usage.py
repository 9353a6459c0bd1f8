"""The dashboard's Usage tab and batch costs in a real browser: what the page shows for a range
is what `/v1/organization/usage/*` and `/v1/organization/costs` report for the same range, a
priced model's cost appears (billed and real time), an unpriced one shows "no price"."""

from __future__ import annotations

import json
import re
import urllib.parse
import urllib.request
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from browser_settings import FREE_MODEL, KEY, MODEL
from openai import OpenAI
from playwright.sync_api import Page, expect
from polling import poll
from sdk_helpers import chat_line, submit
from test_dashboard import WAIT_MS, sign_in

from backfill.testing.server import BackfillProcess

MONEY = re.compile(r"\$([\d,]+\.\d+)")


def number(text: str | None) -> int:
    return int(re.sub(r"[^\d]", "", text or "") or "0")


def dollars(text: str | None) -> Decimal:
    m = MONEY.search(text or "")
    assert m, f"no amount in {text!r}"
    return Decimal(m[1].replace(",", ""))


def report(server: BackfillProcess, name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Every bucket of one organization report, following `next_page`."""
    buckets: list[dict[str, Any]] = []
    query = dict(params)
    for _ in range(50):
        url = f"{server.base_url}/organization/{name}?{urllib.parse.urlencode(query)}"
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {KEY}"})
        with urllib.request.urlopen(request, timeout=15) as answer:
            body = json.loads(answer.read())
        buckets += body["data"]
        if not body["has_more"]:
            return buckets
        query["page"] = body["next_page"]
    raise AssertionError("the report did not end")


def api_view(server: BackfillProcess, start: int, end: int, width: str) -> dict[str, Any]:
    """What the page should show for `[start, end)`, from the API itself."""
    usage = {"start_time": start, "end_time": end, "bucket_width": width, "group_by": "model"}
    totals = dict.fromkeys(("requests", "input", "cached", "output"), 0)
    models: dict[str, int] = {}
    starts: set[int] = set()
    for kind in ("usage/completions", "usage/embeddings"):
        for bucket in report(server, kind, usage):
            starts.add(bucket["start_time"])
            for r in bucket["results"]:
                totals["requests"] += r["num_model_requests"]
                totals["input"] += r["input_tokens"]
                totals["cached"] += r.get("input_cached_tokens", 0)
                totals["output"] += r.get("output_tokens", 0)
                models[r["model"]] = models.get(r["model"], 0) + r["num_model_requests"]
    paid = listed = Decimal(0)
    costs = {"start_time": start, "end_time": end, "bucket_width": "1d", "group_by": "line_item"}
    for bucket in report(server, "costs", costs):
        for r in bucket["results"]:
            paid += Decimal(str(r["amount"]["value"]))
            listed += Decimal(str(r["list_amount"]["value"]))
    return {
        "totals": totals,
        "models": models,
        "paid": paid,
        "list": listed,
        "buckets": len(starts),
    }


def page_view(page: Page) -> dict[str, Any]:
    usage = page.locator("#usage")
    expect(usage).to_have_attribute("data-end", re.compile(r"\d+"), timeout=WAIT_MS)
    view = {
        "start": int(usage.get_attribute("data-start") or 0),
        "end": int(usage.get_attribute("data-end") or 0),
        "width": usage.get_attribute("data-width"),
        "totals": {
            k: number(page.text_content(f"dd[data-total='{k}']"))
            for k in ("requests", "input", "cached", "output")
        },
        "models": {
            row.get_attribute("data-model"): number(
                row.locator("td[data-field='requests']").text_content()
            )
            for row in page.locator("table.usage-models tbody tr").all()
        },
    }
    paid = page.locator("#usage-summary [data-costs='paid']")
    if paid.count():
        view["paid"] = dollars(paid.text_content())
        view["list"] = dollars(page.text_content("#usage-summary [data-costs='list']"))
    return view


def matches(server: BackfillProcess, page: Page) -> tuple[dict[str, Any], dict[str, Any]]:
    shown = page_view(page)
    return shown, api_view(server, shown["start"], shown["end"], shown["width"])


def agree(pair: tuple[dict[str, Any], dict[str, Any]]) -> bool:
    shown, api = pair
    if shown["totals"] != api["totals"] or shown["models"] != api["models"]:
        return False
    # the page rounds amounts to the micro-unit at most, as the API gives them
    return shown.get("paid") == api["paid"] and shown.get("list") == api["list"]


@pytest.fixture(scope="module")
def finished(client: OpenAI) -> dict[str, str]:
    """One completed batch of the priced model and one of the unpriced."""
    priced = submit(
        client,
        [
            chat_line(f"p-{i}", f"count the words here {i} #sleep:10", model=MODEL)
            for i in range(12)
        ],
        metadata={"name": "priced"},
    )
    free = submit(
        client,
        [chat_line(f"f-{i}", f"no price for {i}", model=FREE_MODEL) for i in range(5)],
        metadata={"name": "unpriced"},
    )
    for batch in (priced, free):
        poll(
            lambda b=batch: client.batches.retrieve(b.id),
            lambda b: b.status == "completed",
            what=f"batch {batch.id} to complete",
            timeout=60,
        )
    return {"priced": priced.id, "free": free.id}


def test_batch_cost_on_the_batches_and_batch_pages(
    page: Page, ui: str, client: OpenAI, finished: dict[str, str]
) -> None:
    batch = client.batches.retrieve(finished["priced"])
    cost = (batch.model_extra or {})["cost"]
    assert cost is not None and cost["amount"]["value"] > 0
    sign_in(page, ui)
    row = page.locator(f"tr[data-batch='{finished['priced']}']")
    amount = row.locator("[data-cost='amount']")
    expect(amount).to_be_visible(timeout=WAIT_MS)
    amount_text = amount.text_content() or ""
    assert dollars(amount_text) == Decimal(str(cost["amount"]["value"]))
    realtime = row.locator("[data-cost='realtime']")
    assert dollars(realtime.text_content()) == Decimal(str(cost["realtime_equivalent"]["value"]))
    # the unpriced model's batch has no cost
    expect(page.locator(f"tr[data-batch='{finished['free']}'] .cost")).to_have_count(0)

    page.goto(f"{ui}#/batch/{finished['priced']}")
    expect(page.locator(".facts [data-cost='amount']")).to_have_text(amount_text, timeout=WAIT_MS)
    page.goto(f"{ui}#/batch/{finished['free']}")
    expect(page.locator(".facts")).to_contain_text("no price", timeout=WAIT_MS)


def test_usage_tab_matches_the_api_for_each_range(
    page: Page, ui: str, server: BackfillProcess, finished: dict[str, str], shots: Path
) -> None:
    # the strict CSP holds: nothing on the page is refused (no inline style or script)
    page.add_init_script(
        "window.cspViolations = [];"
        "document.addEventListener('securitypolicyviolation',"
        " (e) => window.cspViolations.push(e.violatedDirective));"
    )
    sign_in(page, ui)
    expect(page.locator("#nav")).to_be_visible(timeout=WAIT_MS)
    page.click("#nav a[data-page='usage']")
    expect(page.locator("#nav a[data-page='usage']")).to_have_class(re.compile("active"))
    for key, width in (("7d", "1d"), ("24h", "1h"), ("30d", "1d")):
        if key != "7d":
            page.click(f".segmented a[data-range='{key}']")
        expect(page.locator("#usage")).to_have_attribute("data-range", key, timeout=WAIT_MS)
        shown, api = poll(
            lambda: matches(server, page),
            agree,
            what=f"the {key} usage page to show what the API reports",
            timeout=30,
        )
        assert shown["width"] == width
        assert shown["totals"]["requests"] >= 17 and shown["totals"]["output"] > 0
        assert {MODEL, FREE_MODEL} <= set(shown["models"])
        assert api["paid"] > 0 and api["list"] == 2 * api["paid"]  # the default 50% discount
        # the unpriced model shows its tokens but no price; the priced one its costs
        free = page.locator(f"table.usage-models tr[data-model='{FREE_MODEL}']")
        expect(free.locator("[data-cost='none']")).to_have_text("no price")
        assert number(free.locator("td[data-field='input']").text_content()) > 0
        priced = page.locator(f"table.usage-models tr[data-model='{MODEL}']")
        expect(priced.locator("[data-cost='paid']")).to_contain_text("$")
        expect(
            page.locator(f"table.usage-costs tr[data-line-item='{MODEL}, batch']")
        ).to_be_visible()
        # a bar for every bucket of the range, empty or not (24 hours, 7 or 30 days)
        # (one more when the range's last second starts a new bucket or a day was 25 hours long)
        assert api["buckets"] - {"24h": 24, "7d": 7, "30d": 30}[key] in (0, 1)
        expect(page.locator("#usage-requests svg.chart g.bucket")).to_have_count(api["buckets"])
        if key == "7d":
            page.screenshot(path=str(shots / "usage.png"), full_page=True)
    assert page.evaluate("window.cspViolations") == []
