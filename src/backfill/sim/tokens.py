"""Tokens without a tokenizer: deterministic prompt lengths, prefix-block hashes, dummy output.

The simulator never looks at meaning, only at lengths and at which prompts share a prefix, so a
whitespace "tokenizer" is enough and costs no model download:

- A word is a whitespace-separated piece of text; each word is one token.
- Chat prompts follow a Llama-3-like template: 1 BOS token, then per message 4 template tokens
  (start-header, role, end-header, end-of-turn) + the words of its content (text parts of a
  list content are joined), then 3 tokens that open the assistant's reply. So
  `prompt_tokens = 1 + sum(4 + words(content)) + 3`.
- Completion prompts: 1 BOS token + the words of the prompt (a list of token ids counts as its
  length, with the ids as tokens).

The token *sequence* (template markers, role names and words) feeds the prefix cache: the prompt
is cut into full blocks of `block_size` tokens and each block is identified by a hash chained
over its predecessor (`hash((parent, tokens_of_block))`, vLLM's scheme), so two prompts that
start with the same system message and messages share exactly the blocks they have in common.
A partial last block is never cached, as in vLLM. Hashes use Python's `hash`, which is stable
within one process: that is the only place they are compared.

Output tokens are dummy words taken from a fixed 16-word cycle; `output_text(start, stop)` is
the text of output tokens `start..stop-1`, each a leading space plus a word, so concatenated
stream chunks equal the non-streamed text.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Prompt", "chat_prompt", "completion_prompt", "output_text"]

_BOS = "<|begin_of_text|>"
_START = "<|start_header_id|>"
_END_HEADER = "<|end_header_id|>"
_EOT = "<|eot_id|>"


@dataclass(frozen=True, slots=True)
class Prompt:
    """A prompt as the engine sees it: its length and the hash of each full block."""

    num_tokens: int
    block_hashes: tuple[int, ...]

    @classmethod
    def from_tokens(cls, tokens: Sequence[Hashable], block_size: int = 16) -> Prompt:
        hashes: list[int] = []
        parent = 0
        for start in range(0, len(tokens) - block_size + 1, block_size):
            parent = hash((parent, tuple(tokens[start : start + block_size])))
            hashes.append(parent)
        return cls(len(tokens), tuple(hashes))

    @classmethod
    def synthetic(
        cls,
        num_tokens: int,
        key: Hashable,
        *,
        shared_prefix: tuple[Hashable, int] | None = None,
        block_size: int = 16,
    ) -> Prompt:
        """A prompt of `num_tokens` unique tokens (unique per `key`), without building them.

        `shared_prefix=(prefix_key, prefix_tokens)` makes the first `prefix_tokens` tokens the
        same for every prompt with that `prefix_key` (a shared system prompt), so their full
        blocks hit the prefix cache.
        """
        prefix_key, prefix_len = shared_prefix if shared_prefix is not None else (None, 0)
        hashes: list[int] = []
        parent = 0
        for index in range(num_tokens // block_size):
            inside = (index + 1) * block_size <= prefix_len
            parent = hash((parent, (prefix_key, index) if inside else (key, index)))
            hashes.append(parent)
        return cls(num_tokens, tuple(hashes))


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return "" if content is None else str(content)


def chat_prompt(messages: Sequence[Any], block_size: int = 16) -> Prompt:
    """The prompt of a chat request (see the module docstring for the template)."""
    tokens: list[str] = [_BOS]
    for message in messages:
        role = str(message.get("role", "user")) if isinstance(message, dict) else "user"
        content = message.get("content") if isinstance(message, dict) else message
        tokens.append(_START)
        tokens.append(role)
        tokens.append(_END_HEADER)
        tokens.extend(_text_of(content).split())
        tokens.append(_EOT)
    tokens += (_START, "assistant", _END_HEADER)
    return Prompt.from_tokens(tokens, block_size)


def completion_prompt(prompt: str | Sequence[int], block_size: int = 16) -> Prompt:
    """The prompt of a completions request: BOS + words, or BOS + the given token ids."""
    tokens: list[Hashable] = [_BOS]
    if isinstance(prompt, str):
        tokens.extend(prompt.split())
    else:
        tokens.extend(prompt)
    return Prompt.from_tokens(tokens, block_size)


_WORDS = (
    "lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit",
    "sed", "do", "eiusmod", "tempor", "incididunt", "ut", "labore", "et",
)  # fmt: skip
_CYCLE = len(_WORDS)
_PIECES = [" " + w for w in _WORDS]
_STARTS = [0]
for _piece in _PIECES:
    _STARTS.append(_STARTS[-1] + len(_piece))
_PERIOD_CHARS = _STARTS[-1]
_REPEATS = 256
_LONG = "".join(_PIECES) * _REPEATS  # 4096 tokens of text


def output_text(start: int, stop: int) -> str:
    """Text of output tokens `start..stop-1` (one leading-space word per token)."""
    count = stop - start
    if count <= 0:
        return ""
    first = start % _CYCLE
    if first + count <= _CYCLE * _REPEATS:
        end = first + count
        return _LONG[_STARTS[first] : (end // _CYCLE) * _PERIOD_CHARS + _STARTS[end % _CYCLE]]
    return "".join(_PIECES[i % _CYCLE] for i in range(start, stop))
