"""Prices: what a piece of work costs, in integer micro-units of a currency. Pure arithmetic.

The operator's price table (`[prices.MODEL]` in the config, `settings.PriceConfig`) gives per
model the real-time price per million tokens of input, cached input and output, a currency and
the batch discount. Every ledger entry (`domain/usage.py`) is priced once, when it is recorded,
with the table of the process that records it; a later price change does not rewrite the past.

The rules:
- Tokens as OpenAI counts them: cached input tokens are part of the input tokens (priced at
  `cached_input`, by default the input price) and reasoning tokens are part of the output
  tokens (priced as output). So an entry's real-time price, exactly, is
  `(input - cached) * input + cached * cached_input + output * output` per million tokens.
  A cached count above the input count (a confused upstream) is capped at the input count.
- No floats in money. A price per million tokens is a decimal with at most 6 places: in
  micro-units per token that is the same number, so `price * 10**6` is an integer number of
  *pico*-units (1e-12) per token and the exact cost of an entry is an integer of pico-units.
  The batch factor `1 - batch_discount` is a decimal with at most 6 places too (an integer of
  parts per million).
- Rounding, once per entry (an entry is one recorded segment, or one real-time request): the
  exact real-time cost is rounded half up to the micro-unit (`list_micros`); the billed cost is
  the *exact* real-time cost times the factor, rounded half up to the micro-unit
  (`billed_micros`), not the rounded list price times the factor. Sums (a batch's cost, a
  report's buckets) add rounded entries, so they equal the sum of what the ledger holds.
- `batch_discount` is the share taken off the real-time price: 0.5 (the default) bills a
  batch at half price, 0.25 at 75 %, 0 at full price. Real-time requests pay full price.
- A model without a price costs nothing and has no currency (`Cost` None): its entries record
  0 and currency None, and the batch's `cost` is null.
- A batch has one model, so one currency; if the table moves a model to another currency while
  its batch runs, the batch's sums keep adding and take the latest currency (don't do that).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol

from backfill.domain.records import Cost, Usage

#: a price per million tokens is this many pico-units per token per unit of currency
PICO_PER_MICRO = 10**6
PPM = 10**6
#: the default share taken off the real-time price for batch work
DEFAULT_BATCH_DISCOUNT = Decimal("0.5")


def exact_millionths(value: Decimal, what: str) -> int:
    """`value * 10**6` as an integer (ValueError if negative or finer than 6 decimal places)."""
    scaled = value * PPM
    if not value.is_finite() or value < 0 or scaled != scaled.to_integral_value():
        raise ValueError(f"{what} must be a non-negative number with at most 6 decimals: {value}")
    return int(scaled)


def round_half_up(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded half up, for non-negative integers."""
    return (2 * numerator + denominator) // (2 * denominator)


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """One model's real-time price, in pico-units per token, and its batch factor."""

    currency: str
    input_pico: int
    cached_input_pico: int
    output_pico: int
    batch_factor_ppm: int  # (1 - batch_discount) in millionths

    @classmethod
    def of(
        cls,
        *,
        currency: str,
        input: Decimal,
        output: Decimal,
        cached_input: Decimal | None = None,
        batch_discount: Decimal = DEFAULT_BATCH_DISCOUNT,
    ) -> ModelPrice:
        """From prices per million tokens (`cached_input` None: the input price)."""
        if not 0 <= batch_discount <= 1:
            raise ValueError(f"batch_discount must be between 0 and 1: {batch_discount}")
        return cls(
            currency=currency,
            input_pico=exact_millionths(input, "input price"),
            cached_input_pico=exact_millionths(
                input if cached_input is None else cached_input, "cached_input price"
            ),
            output_pico=exact_millionths(output, "output price"),
            batch_factor_ppm=exact_millionths(1 - batch_discount, "batch factor"),
        )

    def list_pico(self, usage: Usage) -> int:
        """The exact real-time price of `usage`, in pico-units."""
        cached = max(0, min(usage.cached_tokens, usage.input_tokens))
        return (
            (usage.input_tokens - cached) * self.input_pico
            + cached * self.cached_input_pico
            + usage.output_tokens * self.output_pico
        )

    def cost(self, usage: Usage, *, batch: bool) -> Cost:
        """One entry's cost (rounded half up to the micro-unit, see the module doc)."""
        exact = self.list_pico(usage)
        listed = round_half_up(exact, PICO_PER_MICRO)
        if not batch:
            return Cost(self.currency, listed, listed)
        billed = round_half_up(exact * self.batch_factor_ppm, PICO_PER_MICRO * PPM)
        return Cost(self.currency, billed, listed)


class PriceSpec(Protocol):
    """What the config gives per model (`settings.PriceConfig` has these attributes)."""

    @property
    def input(self) -> Decimal: ...
    @property
    def cached_input(self) -> Decimal | None: ...
    @property
    def output(self) -> Decimal: ...
    @property
    def currency(self) -> str: ...
    @property
    def batch_discount(self) -> Decimal | None: ...


@dataclass(frozen=True, slots=True)
class PriceTable:
    """Prices by model name; `cost` is None for a model without one."""

    prices: Mapping[str, ModelPrice]

    @classmethod
    def from_config(
        cls,
        specs: Mapping[str, PriceSpec],
        default_discount: Decimal = DEFAULT_BATCH_DISCOUNT,
    ) -> PriceTable:
        return cls(
            {
                model: ModelPrice.of(
                    currency=spec.currency,
                    input=spec.input,
                    cached_input=spec.cached_input,
                    output=spec.output,
                    batch_discount=(
                        default_discount if spec.batch_discount is None else spec.batch_discount
                    ),
                )
                for model, spec in specs.items()
            }
        )

    def cost(self, model: str | None, usage: Usage, *, batch: bool) -> Cost | None:
        price = self.prices.get(model or "")
        return None if price is None else price.cost(usage, batch=batch)


def micros_to_amount(micros: int) -> float:
    """Micro-units as the number OpenAI's costs API shows (`amount.value`): exact for any
    amount below 10**9 units (15 significant digits survive a double; rounded to 6 places so
    the nearest double prints as the decimal)."""
    return round(micros / PPM, 6)
