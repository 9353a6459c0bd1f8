"""Usage and cost reports over the ledger, in the shape of OpenAI's Usage and Costs API.

The store sums ledger entries per time bucket and group (`Store.usage_totals`, SQL `GROUP BY`
on both backends); this module holds the pure parts around it: bucket widths and limits, the
page cursor, which endpoints each report counts, and what a cost `line_item` is.

Buckets start at the query's `start_time` and are `bucket_width` long (`1m`, `1h`, `1d`); the
last one ends at `end_time` when the range is not a whole number of buckets. Every bucket in
the range is reported, empty or not, a page of `limit` buckets at a time; `next_page` is the
start of the next page's first bucket, opaque to clients (`page_<base64>`).

Reports:
- completions: `/v1/chat/completions`, `/v1/completions` and `/v1/responses` entries, batch
  and real time (`batch=true|false` picks one);
- embeddings: `/v1/embeddings` entries;
- costs: every entry with a price, as billed (`cost_micros`: batch work at the batch
  discount). A cost `line_item` is `"<model>, batch"` or `"<model>, realtime"`: the ledger
  prices each entry as a whole, so it splits by model and by how the work ran, not by input
  and output tokens. Entries of an unpriced model (no currency) cost nothing and are left out
  of costs; their tokens are in the usage reports.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from backfill.domain.usage import BATCH

#: `bucket_width` -> seconds
WIDTHS = {"1m": 60, "1h": 3600, "1d": 86400}
#: `bucket_width` -> (default, maximum) buckets a page (as OpenAI's spec gives them)
USAGE_LIMITS = {"1m": (60, 1440), "1h": (24, 168), "1d": (7, 31)}
#: costs: only `1d`, 7 buckets by default, at most 180
COST_LIMITS = {"1d": (7, 180)}

COMPLETIONS_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
EMBEDDINGS_ENDPOINTS = ("/v1/embeddings",)

#: what `Store.usage_totals` can group by (`batch` groups by the entry's kind)
GROUP_KEYS = ("project_id", "api_key_id", "model", "batch", "currency")
#: the ledger fields `Store.usage_totals` sums (the same names on `UsageEntry` and `UsageTotal`)
SUMMED = (
    "requests",
    "input_tokens",
    "cached_tokens",
    "output_tokens",
    "reasoning_tokens",
    "engine_ms",
    "cost_micros",
    "list_micros",
)

#: Unix seconds a report accepts: the store's integers stay far from their limits
MAX_TIME = 10**11

_CURSOR_PREFIX = "page_"


@dataclass(frozen=True, slots=True)
class UsageTotal:
    """Sums of the ledger entries of one bucket and group. A group key not grouped by is None
    (`batch`: whether the entries are batch work)."""

    bucket: int  # the bucket's start (Unix seconds)
    project_id: str | None = None
    api_key_id: str | None = None
    model: str | None = None
    batch: bool | None = None
    currency: str | None = None
    requests: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    engine_ms: int = 0
    cost_micros: int = 0
    list_micros: int = 0


def is_batch(kind: str) -> bool:
    return kind == BATCH


def sort_key(t: UsageTotal) -> tuple[object, ...]:
    """One order on every backend (SQL orders NULLs differently): bucket, then group keys with
    None first."""
    keys = (t.project_id, t.api_key_id, t.model, t.batch, t.currency)
    return (t.bucket, *((k is not None, k if k is not None else "") for k in keys))


def bucket_starts(start: int, end: int, width: int) -> list[int]:
    """Starts of every bucket of `[start, end)`."""
    return list(range(start, end, width))


def encode_page(next_start: int) -> str:
    raw = f"v1:{next_start}".encode()
    return _CURSOR_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page(cursor: str) -> int | None:
    """The bucket start a `next_page` cursor names, or None if it is not one of ours."""
    if not cursor.startswith(_CURSOR_PREFIX):
        return None
    body = cursor[len(_CURSOR_PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    version, _, value = raw.partition(":")
    if version != "v1" or not value.isdigit() or len(value) > 12:
        return None
    return int(value)


def line_item(model: str | None, batch: bool | None) -> str | None:
    if model is None or batch is None:
        return None
    return f"{model}, {'batch' if batch else 'realtime'}"
