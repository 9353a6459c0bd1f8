"""Prompt prefixes: the text each endpoint's prompt is read as, and chained block hashes that
group requests by their common prefix."""

from __future__ import annotations

import random

from backfill.domain.prefixes import affinity_key, prefix_blocks, prompt_text

CHAT = "/v1/chat/completions"


def chat(*contents: str) -> dict[str, object]:
    roles = ["system", "user", "assistant"]
    return {"messages": [{"role": roles[i % 3], "content": c} for i, c in enumerate(contents)]}


def test_prompt_text_per_endpoint() -> None:
    assert prompt_text(CHAT, chat("sys", "hi")) == "\x00system\x01sys\x00user\x01hi"
    parts = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"text": "b"}]}]
    }
    assert prompt_text(CHAT, parts) == "\x00user\x01ab"
    assert prompt_text("/v1/completions", {"prompt": "p"}) == "p"
    assert prompt_text("/v1/completions", {"prompt": [1, 2, 3]}) == ""  # token ids: no text
    assert prompt_text("/v1/embeddings", {"input": ["a", "b"]}) == "a\x03b"
    assert (
        prompt_text("/v1/responses", {"instructions": "be brief", "input": "q"}) == "be brief\x02q"
    )
    assert prompt_text(CHAT, {"messages": "nonsense"}) == ""


def test_blocks_are_equal_exactly_as_far_as_the_text_is() -> None:
    doc = "x" * 1000
    a = prefix_blocks(prompt_text(CHAT, chat(doc, "question one")))
    b = prefix_blocks(prompt_text(CHAT, chat(doc, "question two, longer")))
    shared = len(prompt_text(CHAT, chat(doc))) // 256
    assert a[:shared] == b[:shared] and a[shared] != b[shared]
    assert len(prefix_blocks("y" * 10_000)) == 16  # bounded
    assert len(prefix_blocks("short")) == 1 and prefix_blocks("") == ()
    # chained: the same block after different text hashes differently
    assert prefix_blocks("a" * 256 + "z" * 256)[1] != prefix_blocks("b" * 256 + "z" * 256)[1]


def test_sorting_by_blocks_groups_requests_by_prefix() -> None:
    rng = random.Random(7)
    prefixes = [f"system prompt {n} " * 60 for n in range(5)]
    lines = [(p, f"question {rng.random()}") for p in prefixes for _ in range(8)]
    rng.shuffle(lines)
    keys = [prefix_blocks(prompt_text(CHAT, chat(p, q))) for p, q in lines]
    ordered = [lines[i][0] for i in sorted(range(len(lines)), key=keys.__getitem__)]
    runs = sum(1 for i in range(len(ordered)) if i == 0 or ordered[i] != ordered[i - 1])
    assert runs == 5  # each prefix one contiguous group


def test_affinity_key_names_a_group_of_long_enough_prefixes() -> None:
    doc = "shared document " * 64
    k1 = affinity_key(prefix_blocks(prompt_text(CHAT, chat(doc, "a"))))
    k2 = affinity_key(prefix_blocks(prompt_text(CHAT, chat(doc, "b"))))
    assert k1 is not None and k1 == k2
    assert affinity_key(prefix_blocks("tiny")) is None
