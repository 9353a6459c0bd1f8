"""Small helpers for driving a real `backfill serve` with the official `openai` SDK, shared by
the integration and acceptance tiers.

Input lines are built as dicts and serialized here so every test states only what differs.
Waiting goes through `polling.poll`: a deadline, and a timeout names what it waited for and the
last state.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Final

from openai import OpenAI
from openai.types import Batch, FileObject
from polling import poll

CHAT: Final = "/v1/chat/completions"
COMPLETIONS: Final = "/v1/completions"
EMBEDDINGS: Final = "/v1/embeddings"
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})


def chat_line(custom_id: str, content: str, model: str = "m", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT,
        "body": {"model": model, "messages": [{"role": "user", "content": content}], **body},
    }


def completion_line(custom_id: str, prompt: str, model: str = "m") -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": COMPLETIONS,
        "body": {"model": model, "prompt": prompt},
    }


def embedding_line(custom_id: str, text: str, model: str = "m") -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": EMBEDDINGS,
        "body": {"model": model, "input": text},
    }


def jsonl(lines: Iterable[dict[str, Any] | str]) -> bytes:
    """Dicts are serialized; strings are taken verbatim (for deliberately broken lines)."""
    out = [line if isinstance(line, str) else json.dumps(line) for line in lines]
    return ("\n".join(out) + "\n").encode()


def words(text: str) -> int:
    return len(text.split())


def upload(
    client: OpenAI, data: bytes, name: str = "in.jsonl", purpose: str = "batch"
) -> FileObject:
    return client.files.create(file=(name, data), purpose=purpose)  # type: ignore[arg-type]


def submit(
    client: OpenAI,
    lines: Iterable[dict[str, Any] | str],
    endpoint: str = CHAT,
    **create: Any,
) -> Batch:
    file = upload(client, jsonl(lines))
    return client.batches.create(
        input_file_id=file.id,
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window="24h",
        **create,
    )


def wait_batch(
    client: OpenAI,
    batch_id: str,
    statuses: Iterable[str] = TERMINAL,
    timeout: float = 30.0,
) -> Batch:
    wanted = frozenset(statuses)
    return poll(
        lambda: client.batches.retrieve(batch_id),
        lambda b: b.status in wanted,
        timeout=timeout,
        what=f"batch {batch_id} to reach {sorted(wanted)}",
    )


def run_batch(
    client: OpenAI,
    lines: Iterable[dict[str, Any] | str],
    endpoint: str = CHAT,
    timeout: float = 30.0,
    **create: Any,
) -> Batch:
    batch = submit(client, lines, endpoint, **create)
    return wait_batch(client, batch.id, timeout=timeout)


def read_jsonl(client: OpenAI, file_id: str) -> list[dict[str, Any]]:
    text = client.files.content(file_id).text
    return [json.loads(line) for line in text.splitlines() if line.strip()]
