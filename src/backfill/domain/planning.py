"""The order a shard's requests are dispatched in: by prompt prefix, so the engine's prefix cache
serves them; long expected outputs first inside a prefix group. Pure: keys, the order, and the
reads that fetch the bodies back. The output files keep input order whatever this says (the
finalizer copies result lines back by line number).

A request's `dispatch_key` is a few dozen bytes, made once when the shard is first read:

    group (GROUP_BLOCKS chained block hashes, zero-padded) | 255 - output rank | more blocks
    | body digest

compared as bytes. The chained hashes (`prefixes.prefix_blocks`) make byte order trie order:
requests that share their first k blocks sit next to each other, and the longer the shared
prefix the closer. Inside a group (the same first `GROUP_BLOCKS` blocks, about 1,000
characters) the longest expected outputs go first, so the long tails start early instead of
trailing at the group's end; then the deeper blocks keep trie order inside the group, and the
body digest puts identical bodies side by side (the dispatcher answers them with one call).

Why hashes and not the input order of first appearance: every shard of every batch of a model
sorts the same prefix to the same place, so shards running at once in one worker walk the
prefix groups in the same order and meet at the engine on the same prefixes (the dispatcher's
hot groups, `dispatch/hot_groups.py`, pull them closer still). A workload without shared prefixes
gets an order as random as any: no slower, the engine has nothing to share either way.

Memory: the planning pass holds one `Planned` per unfinished line of the shard (a key of at
most 8 x 8 + 9 bytes plus three ints), never a body. The bodies are read again in key order,
`chunk` requests at a time, with ranged reads coalesced when the lines lie close together
(`coalesce`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from backfill.domain.prefixes import prefix_blocks, prompt_text

#: blocks that make a prefix group (inside which long outputs go first)
GROUP_BLOCKS = 4
#: blocks kept in a key in all (bounded memory; 2,048 characters of prompt)
KEY_BLOCKS = 8
#: two line reads are merged when at most this many bytes lie between them
MERGE_GAP = 64 * 1024
#: and while the merged read stays at most this long
MAX_READ = 1 << 20

_OUTPUT_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
_PAD = bytes(8)


@dataclass(frozen=True, slots=True)
class Planned:
    """One request of a shard: its dispatch key and where its line lies in the input."""

    key: bytes
    line_no: int
    start: int  # byte offset of the line in the input file
    end: int  # exclusive, without the newline


def output_cap(body: dict[str, Any]) -> int | None:
    """The request's output cap in tokens (None: none given, the engine's own limit)."""
    for name in _OUTPUT_FIELDS:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def output_rank(cap: int | None) -> int:
    """0..255, higher for longer expected output (log2 of the cap; no cap ranks highest)."""
    if cap is None:
        return 255
    return min(cap.bit_length(), 254)


def dispatch_key(endpoint: str, body: dict[str, Any], digest: bytes = b"") -> bytes:
    """The request's place in the dispatch order (compare as bytes; see the module doc).
    `digest` (the body's, `duplicates.body_key`) goes last so identical bodies sit together."""
    blocks = prefix_blocks(prompt_text(endpoint, body), max_blocks=KEY_BLOCKS)
    packed = [h.to_bytes(8, "big") for h in blocks]
    head = packed[:GROUP_BLOCKS] + [_PAD] * (GROUP_BLOCKS - len(packed[:GROUP_BLOCKS]))
    rank = bytes((255 - output_rank(output_cap(body)),))
    return b"".join(head) + rank + b"".join(packed[GROUP_BLOCKS:]) + b"\xff" + digest[:8]


def group_of(key: bytes) -> bytes:
    """The prefix group a key belongs to (its first `GROUP_BLOCKS` hashes)."""
    return key[: 8 * GROUP_BLOCKS]


def plan(requests: Iterable[Planned]) -> list[Planned]:
    """The requests in dispatch order: by key, then by line number."""
    return sorted(requests, key=lambda p: (p.key, p.line_no))


def coalesce(
    chunk: Iterable[Planned], *, gap: int = MERGE_GAP, max_read: int = MAX_READ
) -> list[tuple[int, int, list[Planned]]]:
    """Ranged reads `(start, end, lines)` that fetch these lines: lines in file order, merged
    while the bytes between them are at most `gap` and the read at most `max_read` long (a
    single line longer than that is one read of its own)."""
    reads: list[tuple[int, int, list[Planned]]] = []
    start = end = -1
    lines: list[Planned] = []
    for p in sorted(chunk, key=lambda p: p.start):
        if lines and p.start - end <= gap and p.end - start <= max_read:
            lines.append(p)
            end = max(end, p.end)
            continue
        if lines:
            reads.append((start, end, lines))
        start, end, lines = p.start, p.end, [p]
    if lines:
        reads.append((start, end, lines))
    return reads


def chunks(order: list[Planned], size: int) -> Iterator[list[Planned]]:
    """The planned order cut into pieces of `size` (the bodies held at once)."""
    for i in range(0, len(order), max(1, size)):
        yield order[i : i + size]
