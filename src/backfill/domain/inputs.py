"""Reading the requests of one shard back out of its byte range of the input file, streamed:
memory holds one line at a time, never the shard. `numbered_spans` also says where each line
lies, so a planned run (`domain/planning.py`) can read the bodies again in another order."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

from backfill.domain import exact_json
from backfill.domain.validation import BOM


async def numbered_lines(
    lines: AsyncIterable[bytes], first_line: int
) -> AsyncIterator[tuple[int, bytes]]:
    """(line_no, line) of each non-blank line of a shard's input, numbered from `first_line`;
    blank lines are counted but skipped, exactly as validation counted them."""
    line_no = first_line
    async for raw in lines:
        if line_no == first_line and raw.startswith(BOM):
            raw = raw[3:]
        if raw.strip():
            yield line_no, raw
        line_no += 1


async def numbered_spans(
    lines: AsyncIterable[bytes], first_line: int, start: int
) -> AsyncIterator[tuple[int, int, bytes]]:
    """(line_no, byte offset, line) of each non-blank line of a shard's input that begins at
    byte `start` of the file; the offset is where `line` itself begins (after a BOM)."""
    line_no = first_line
    offset = start
    async for raw in lines:
        size = len(raw) + 1
        at = offset
        if line_no == first_line and raw.startswith(BOM):
            raw = raw[3:]
            at += 3
        if raw.strip():
            yield line_no, at, raw
        line_no += 1
        offset += size


def parse_request(raw: bytes) -> tuple[str, dict[str, Any]]:
    """(custom_id, body) of one validated input line."""
    obj = exact_json.loads(raw)
    return obj["custom_id"], obj["body"]


async def iter_requests(
    lines: AsyncIterable[bytes], first_line: int
) -> AsyncIterator[tuple[int, str, dict[str, Any]]]:
    """(line_no, custom_id, body) of each request of a shard's input lines.

    Lines were validated, so parsing cannot fail here. Bodies keep every number's exact value
    (`exact_json`): they go upstream as written.
    """
    async for line_no, raw in numbered_lines(lines, first_line):
        obj = exact_json.loads(raw)
        yield line_no, obj["custom_id"], obj["body"]
