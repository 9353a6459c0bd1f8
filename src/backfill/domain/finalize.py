"""Pure pieces of finalization: deterministic result-file ids and the requests of a shard that
never ran.

Result files get ids derived from the batch id, so a finalization that crashed half-way and is
run again writes the same files instead of leaving orphans behind. The merge itself streams
(`backfill.domain.segments`, the one reader of the segment format).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterable, AsyncIterator, Container

import orjson

from backfill.domain.inputs import numbered_lines


def result_file_id(batch_id: str, kind: str) -> str:
    digest = hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()
    return "file-" + digest[:24]


async def unrun_requests(
    lines: AsyncIterable[bytes], first_line: int, done: Container[int]
) -> AsyncIterator[tuple[int, str]]:
    """(line_no, custom_id) of each request of a shard's input lines (streamed one at a time,
    numbered as the worker numbers them) whose line number is not in `done`."""
    async for line_no, raw in numbered_lines(lines, first_line):
        if line_no not in done:
            yield line_no, orjson.loads(raw)["custom_id"]
