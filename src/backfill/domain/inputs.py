"""Reading the requests of one shard back out of its byte range of the input file."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

from backfill.domain.validation import BOM


def iter_requests(data: bytes, first_line: int) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(line_no, custom_id, body) of each request in a shard's bytes.

    The shard starts at the beginning of line `first_line`; blank lines are counted but skipped,
    exactly as validation counted them. Lines were validated, so parsing cannot fail here.
    """
    if data.startswith(BOM):
        data = data[3:]
    line_no = first_line
    for raw in data.split(b"\n"):
        if raw.strip():
            obj = orjson.loads(raw)
            yield line_no, obj["custom_id"], obj["body"]
        line_no += 1
