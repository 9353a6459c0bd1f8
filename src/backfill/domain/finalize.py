"""Pure pieces of finalization: deterministic result-file ids and merging a shard's records.

Result files get ids derived from the batch id, so a finalization that crashed half-way and is
run again writes the same files instead of leaving orphans behind.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from backfill.domain.results import iter_segment


def result_file_id(batch_id: str, kind: str) -> str:
    digest = hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()
    return "file-" + digest[:24]


def merge_segments(segments: Iterable[bytes]) -> dict[int, tuple[bytes, bytes]]:
    """line_no -> (kind, json line) over a shard's segments; the first record of a line wins,
    so a request recorded twice still appears once."""
    merged: dict[int, tuple[bytes, bytes]] = {}
    for data in segments:
        for line_no, kind, line in iter_segment(data):
            if line_no not in merged:
                merged[line_no] = (kind, line)
    return merged
