"""Submit one of the example files to a Batch API, wait, and print each answer.

    python examples/submit.py examples/classify_tickets.jsonl

Talks to `OPENAI_BASE_URL` with `OPENAI_API_KEY` (defaults: a local `backfill serve` on port
8080 with the key `sk-local`, as in the README's quick start) through the official `openai` SDK,
so it works unchanged against any OpenAI-compatible Batch API.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from openai import OpenAI

TERMINAL = ("completed", "failed", "expired", "cancelled")


def main(path: str) -> int:
    client = OpenAI(
        base_url=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8080/v1"),
        api_key=os.environ.get("OPENAI_API_KEY", "sk-local"),
    )
    data = Path(path).read_bytes()
    endpoint = json.loads(data.splitlines()[0])["url"]
    upload = client.files.create(file=(Path(path).name, data), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint=endpoint, completion_window="24h"
    )
    print(f"{batch.id}: {endpoint}, {len(data.splitlines())} requests", file=sys.stderr)
    while (batch := client.batches.retrieve(batch.id)).status not in TERMINAL:
        counts = batch.request_counts
        if counts is not None:
            print(f"  {batch.status}: {counts.completed}/{counts.total}", file=sys.stderr)
        time.sleep(2)
    print(f"{batch.id}: {batch.status}", file=sys.stderr)
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id is None:
            continue
        for line in client.files.content(file_id).text.splitlines():
            row = json.loads(line)
            print(row["custom_id"], _answer(row))
    return 0 if batch.status == "completed" else 1


def _answer(row: dict[str, Any]) -> str:
    if row.get("error"):
        return f"error: {row['error']}"
    body = row["response"]["body"]
    if "choices" in body:
        choice = body["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        return str(text).strip().replace("\n", " ")
    vector = body["data"][0]["embedding"]
    return f"{len(vector)}-dimensional embedding, starts {vector[:3]}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
