"""Prefix-aware planning (`domain/planning.py`): dispatch keys that group requests by prompt
prefix with long outputs first inside a group, identical bodies side by side, the order, and
the coalesced reads that fetch bodies back; `inputs.numbered_spans` gives each line's offset."""

from __future__ import annotations

import asyncio
import itertools
import random

from backfill.domain.duplicates import body_key
from backfill.domain.inputs import numbered_spans, parse_request
from backfill.domain.planning import (
    KEY_BLOCKS,
    Planned,
    chunks,
    coalesce,
    dispatch_key,
    group_of,
    output_cap,
    output_rank,
    plan,
)

CHAT = "/v1/chat/completions"


def body(system: str, question: str, max_tokens: int | None = 64) -> dict[str, object]:
    out: dict[str, object] = {
        "model": "m",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
    }
    if max_tokens is not None:
        out["max_tokens"] = max_tokens
    return out


def key(b: dict[str, object]) -> bytes:
    return dispatch_key(CHAT, b, body_key(CHAT, b))


def test_shuffled_requests_come_out_grouped_by_prefix() -> None:
    rng = random.Random(3)
    prefixes = [f"prefix {n} " * 200 for n in range(6)]  # ~1,800 characters each
    work = [(p, f"question {i} {rng.random()}") for i, p in enumerate(prefixes * 10)]
    rng.shuffle(work)
    entries = [Planned(key(body(p, q)), i, 0, 0) for i, (p, q) in enumerate(work)]
    order = [work[e.line_no][0] for e in plan(entries)]
    # each prefix is one contiguous run: 6 runs, not ~60
    runs = 1 + sum(a != b for a, b in itertools.pairwise(order))
    assert runs == len(prefixes)
    assert sorted(order) == sorted(p for p, _ in work)  # nothing lost


def test_long_outputs_first_inside_a_group() -> None:
    system = "shared system prompt " * 80
    caps = [16, 1024, None, 256, 4]
    entries = [Planned(key(body(system, f"q{i}", c)), i, 0, 0) for i, c in enumerate(caps)]
    assert len({group_of(e.key) for e in entries}) == 1
    assert [caps[e.line_no] for e in plan(entries)] == [None, 1024, 256, 16, 4]
    assert output_cap({"max_completion_tokens": 7, "max_tokens": 9}) == 7
    assert output_cap({"max_output_tokens": 5}) == 5 and output_cap({"max_tokens": True}) is None
    assert output_rank(None) == 255 > output_rank(1 << 40) > output_rank(2)


def test_identical_bodies_sit_together_and_keys_stay_small() -> None:
    system = "x" * 5000  # deeper than the key's blocks: only the digest tells bodies apart
    bodies = [body(system, q) for q in ["a", "b", "a", "c", "b", "a"]]
    order = plan(Planned(key(b), i, 0, 0) for i, b in enumerate(bodies))
    seq = [bodies[e.line_no]["messages"][1]["content"] for e in order]  # type: ignore[index]
    assert seq.count("a") == 3
    runs = 1 + sum(a != b for a, b in itertools.pairwise(seq))
    assert runs == 3
    assert all(len(key(b)) <= 8 * KEY_BLOCKS + 10 for b in bodies)  # a few dozen bytes
    assert max(len(key(b)) for b in bodies) < 100
    # ties keep file order
    same = [Planned(b"k", n, 0, 0) for n in (5, 2, 9)]
    assert [e.line_no for e in plan(same)] == [2, 5, 9]


def test_coalesce_merges_close_lines_and_bounds_each_read() -> None:
    lines = [Planned(b"", 0, 100, 200), Planned(b"", 1, 0, 50), Planned(b"", 2, 10_000, 10_100)]
    reads = coalesce(lines, gap=100, max_read=1000)
    assert [(s, e, [p.line_no for p in m]) for s, e, m in reads] == [
        (0, 200, [1, 0]),
        (10_000, 10_100, [2]),
    ]
    big = [Planned(b"", i, i * 600, i * 600 + 500) for i in range(4)]
    assert [len(m) for _, _, m in coalesce(big, gap=200, max_read=1200)] == [2, 2]
    assert [len(c) for c in chunks(big, 3)] == [3, 1]


def test_numbered_spans_give_each_lines_offset() -> None:
    data = b'\xef\xbb\xbf{"custom_id":"a","body":{"x":1}}\n\n{"custom_id":"b","body":{}}\n'

    async def lines() -> list[tuple[int, int, bytes]]:
        async def chunked():  # type: ignore[no-untyped-def]
            for piece in data.split(b"\n"):
                yield piece

        return [x async for x in numbered_spans(chunked(), 10, 1000)]

    got = asyncio.run(lines())
    assert [n for n, _, _ in got] == [10, 12]
    for _, at, raw in got:
        assert data[at - 1000 : at - 1000 + len(raw)] == raw
    assert parse_request(got[1][2]) == ("b", {})
