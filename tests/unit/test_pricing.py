"""The pricing arithmetic (`domain/pricing.py`), with every figure worked by hand.

Units: a price of P per million tokens is P micro-units per token (1 micro-unit = 1e-6 of the
currency). Costs are rounded half up to the micro-unit once per entry.
"""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest

from backfill.domain.pricing import ModelPrice, PriceTable, round_half_up
from backfill.domain.records import Cost, Usage
from backfill.settings import PriceConfig, build_settings

D = Decimal


def price(
    input: str,
    output: str,
    cached_input: str | None = None,
    discount: str = "0.5",
    currency: str = "usd",
) -> ModelPrice:
    return ModelPrice.of(
        currency=currency,
        input=D(input),
        output=D(output),
        cached_input=None if cached_input is None else D(cached_input),
        batch_discount=D(discount),
    )


def test_cached_tokens_are_part_of_the_input_and_priced_as_cached() -> None:
    # $2.50 input, $1.25 cached input, $10 output per million tokens.
    # 1,000 input tokens of which 400 cached, 300 output tokens (50 of them reasoning):
    #   uncached input   600 x 2.50 = 1,500 micro-units
    #   cached input     400 x 1.25 =   500
    #   output           300 x 10   = 3,000   (reasoning is part of output, not extra)
    #   real time                   = 5,000 micro-units = $0.005
    #   batch, 50 % off             = 2,500 micro-units = $0.0025
    p = price("2.50", "10", cached_input="1.25")
    usage = Usage(input_tokens=1000, cached_tokens=400, output_tokens=300, reasoning_tokens=50)
    assert p.cost(usage, batch=False) == Cost("usd", 5000, 5000)
    assert p.cost(usage, batch=True) == Cost("usd", 2500, 5000)
    # without a cached price, cached tokens cost the input price: 1,000 x 2.50 + 3,000 = 5,500
    assert price("2.50", "10").cost(usage, batch=False) == Cost("usd", 5500, 5500)


def test_the_discount_is_the_share_taken_off() -> None:
    # 1,000 input tokens at $2.50 = 2,500 micro-units in real time.
    usage = Usage(input_tokens=1000)
    # 0.25 off: 2,500 x 0.75 = 1,875
    assert price("2.50", "0", discount="0.25").cost(usage, batch=True) == Cost("usd", 1875, 2500)
    # 0 off: full price; 1 off: free
    assert price("2.50", "0", discount="0").cost(usage, batch=True) == Cost("usd", 2500, 2500)
    assert price("2.50", "0", discount="1").cost(usage, batch=True) == Cost("usd", 0, 2500)


def test_rounding_is_half_up_per_entry_from_the_exact_amount() -> None:
    # $0.15 input, $0.60 output (per million). 7 input and 3 output tokens:
    #   7 x 0.15 + 3 x 0.60 = 1.05 + 1.80 = 2.85 micro-units
    #   real time: 2.85 -> 3
    #   batch: 2.85 x 0.5 = 1.425 -> 1 (from the exact 2.85, not from the rounded 3: 1.5 -> 2)
    p = price("0.15", "0.60")
    assert p.cost(Usage(input_tokens=7, output_tokens=3), batch=True) == Cost("usd", 1, 3)
    # exactly half: 1 token at $0.50 = 0.5 -> 1 in real time; batch 0.25 -> 0
    half = price("0.50", "0")
    assert half.cost(Usage(input_tokens=1), batch=False) == Cost("usd", 1, 1)
    assert half.cost(Usage(input_tokens=1), batch=True) == Cost("usd", 0, 1)
    # 3 tokens at $0.50 = 1.5 -> 2; batch 0.75 -> 1
    assert half.cost(Usage(input_tokens=3), batch=True) == Cost("usd", 1, 2)
    # 5 tokens at $0.30 = 1.5 -> 2 in real time; batch at 0.5 = 0.75 -> 1
    assert price("0.30", "0").cost(Usage(input_tokens=5), batch=True) == Cost("usd", 1, 2)
    # per entry: two entries of one $0.50 token are 1 + 1 = 2 micro-units in real time,
    # where one entry of two tokens would be 1 (entries are summed after rounding)
    assert half.cost(Usage(input_tokens=2), batch=False) == Cost("usd", 1, 1)
    # the smallest prices (6 decimals: 1 pico-unit per token) add up exactly:
    # 1,500,000 tokens x 0.000001 = 1.5 micro-units -> 2
    tiny = price("0.000001", "0")
    assert tiny.cost(Usage(input_tokens=1_500_000), batch=False) == Cost("usd", 2, 2)


def test_round_half_up() -> None:
    assert [round_half_up(n, 10) for n in (0, 4, 5, 14, 15, 25)] == [0, 0, 1, 1, 2, 3]


def test_a_cached_count_above_the_input_is_capped() -> None:
    # 10 input tokens, "20 cached" (a confused upstream): 10 cached x 1 = 10, not negative
    p = price("2", "0", cached_input="1")
    assert p.cost(Usage(input_tokens=10, cached_tokens=20), batch=False) == Cost("usd", 10, 10)


def test_big_figures_stay_exact() -> None:
    # 10 billion input tokens at $3 = 30,000,000,000 micro-units = $30,000 exactly
    p = price("3", "15")
    assert p.cost(Usage(input_tokens=10**10), batch=True) == Cost("usd", 15 * 10**9, 30 * 10**9)


def test_table_from_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "backfill.toml"
    config.write_text(
        """
[pricing]
batch_discount = 0.25

[prices.llama]
input = 0.15
cached_input = 0.075
output = 0.60

[prices.big]
input = 2.5
output = 10
currency = "EUR"
batch_discount = 0.5
"""
    )
    settings = build_settings(config)
    table = PriceTable.from_config(settings.prices, settings.batch_discount)
    usage = Usage(input_tokens=1000, cached_tokens=400, output_tokens=300)
    # llama: 600 x 0.15 + 400 x 0.075 + 300 x 0.60 = 90 + 30 + 180 = 300; the global 0.25 off
    # bills 225
    assert table.cost("llama", usage, batch=True) == Cost("usd", 225, 300)
    # big: its own 0.5 off; the currency is shown lowercase, as OpenAI's costs API does
    assert table.cost("big", usage, batch=True) == Cost("eur", 2750, 5500)
    assert table.cost("unpriced", usage, batch=True) is None
    assert table.cost(None, usage, batch=True) is None


def test_prices_are_refused_past_six_decimals_or_negative() -> None:
    with pytest.raises(ValueError):
        PriceConfig(input=D("0.0000001"), output=D("1"))
    with pytest.raises(ValueError):
        PriceConfig(input=D("-1"), output=D("1"))
    with pytest.raises(ValueError):
        PriceConfig(input=D("1"), output=D("1"), batch_discount=D("1.5"))
    with pytest.raises(ValueError):
        price("0.0000001", "0")


def test_the_batch_object_shows_cost_as_openai_amounts() -> None:
    from backfill.api.openapi import Batch
    from backfill.api.schemas import batch_object
    from backfill.domain.records import BatchRecord
    from backfill.domain.statuses import BatchStatus

    record = BatchRecord(
        "batch_1", "p", "/v1/chat/completions", "file-1", "24h", BatchStatus.COMPLETED, 1, 2,
        cost=Cost("usd", 2500, 5000),
    )  # fmt: skip
    shown = batch_object(record)
    # 2,500 micro-units billed ($0.0025), 5,000 in real time ($0.005): `amount` objects as in
    # OpenAI's costs API (value a number, currency lowercase)
    assert shown["cost"] == {
        "amount": {"value": 0.0025, "currency": "usd"},
        "realtime_equivalent": {"value": 0.005, "currency": "usd"},
    }
    Batch.model_validate(shown)  # what /openapi.json says
    assert batch_object(replace(record, cost=None))["cost"] is None
