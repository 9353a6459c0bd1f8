"""Prompt prefixes of requests, for dispatching requests that share one close together (so the
engine's prefix cache serves them) and for sending them to the replica that holds it.

A request's prompt is read as text in the order the engine sees it (`prompt_text`): chat
messages role by role, a completion's prompt, a Responses request's instructions and input, an
embedding's input. The text is cut into blocks of `BLOCK_CHARS` characters and each block gets
a *chained* hash (the hash of the block and the previous block's hash, as vLLM's prefix cache
hashes its token blocks): two requests share their first k block hashes exactly when their
prompts share their first k blocks. So

- sorting requests by their block-hash tuples (`prefix_blocks`) puts requests with a common
  prefix next to each other, the longer the common prefix the closer, in trie order, with
  memory bounded per request (`MAX_BLOCKS` 8-byte hashes, whatever the prompt's size);
- the first `AFFINITY_BLOCKS` hashes (`affinity_key`) name a prefix group for routing: requests
  that share at least that much prompt go to the same place.

Characters, not tokens: no tokenizer is needed and block boundaries need not match the
engine's; a shared prefix of N characters shares about N / BLOCK_CHARS blocks either way. A
request without text (token-id prompts) has no blocks, and sorts first, in file order.
"""

from __future__ import annotations

import hashlib
from typing import Any

#: characters per prefix block
BLOCK_CHARS = 256
#: blocks hashed per request (the first 4,096 characters)
MAX_BLOCKS = 16
#: blocks that make a prefix group for routing (the first 512 characters)
AFFINITY_BLOCKS = 2


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: their text, in order
        return "".join(
            part.get("text", "") if isinstance(part, dict) else str(part) for part in content
        )
    return ""


def prompt_text(endpoint: str, body: dict[str, Any]) -> str:
    """The request's prompt as text, in the order the engine reads it ("" when unknown)."""
    if endpoint.endswith("/chat/completions"):
        messages = body.get("messages")
        if not isinstance(messages, list):
            return ""
        return "".join(
            f"\x00{m.get('role', '')}\x01{_content_text(m.get('content'))}"
            for m in messages
            if isinstance(m, dict)
        )
    if endpoint.endswith("/responses"):
        value = body.get("input")
        if isinstance(value, list):
            text = "".join(
                f"\x00{m.get('role', '')}\x01{_content_text(m.get('content'))}"
                for m in value
                if isinstance(m, dict)
            )
        else:
            text = value if isinstance(value, str) else ""
        instructions = body.get("instructions")
        return (instructions if isinstance(instructions, str) else "") + "\x02" + text
    value = body.get("prompt") if endpoint.endswith("/completions") else body.get("input")
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return "\x03".join(value)
    return ""


def prefix_blocks(
    text: str, *, block_chars: int = BLOCK_CHARS, max_blocks: int = MAX_BLOCKS
) -> tuple[int, ...]:
    """Chained 64-bit hashes of the text's first `max_blocks` blocks (a partial last block
    counts: a prompt shorter than one block still has one hash)."""
    out: list[int] = []
    previous = b""
    for start in range(0, min(len(text), block_chars * max_blocks), block_chars):
        digest = hashlib.blake2b(
            previous + text[start : start + block_chars].encode("utf-8", "surrogatepass"),
            digest_size=8,
        ).digest()
        out.append(int.from_bytes(digest, "big"))
        previous = digest
    return tuple(out)


def affinity_key(blocks: tuple[int, ...], depth: int = AFFINITY_BLOCKS) -> int | None:
    """The request's prefix group for routing: its `depth`-th block hash (which chains all the
    blocks before it), or None for a prompt shorter than that (no group worth keeping)."""
    return blocks[depth - 1] if len(blocks) >= depth else None
