"""What the upstream does to a request shows up in the right file: 4xx final, 5xx/429 retried."""

from __future__ import annotations

import time
import uuid

from openai import OpenAI
from sdk_helpers import chat_line, read_jsonl, run_batch

from backfill.testing import UpstreamProcess


def unique(text: str) -> str:
    """Upstream `/stats` counts by exact text and scripted failures remember texts: be unique."""
    return f"{text} {uuid.uuid4().hex}"


def test_upstream_400_goes_to_the_error_file(client: OpenAI) -> None:
    bad = unique("too long #fail400")
    batch = run_batch(
        client,
        [chat_line("ok-1", "fine"), chat_line("bad", bad), chat_line("ok-2", "also fine")],
    )
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (3, 2, 1)
    assert batch.output_file_id is not None and batch.error_file_id is not None

    assert [o["custom_id"] for o in read_jsonl(client, batch.output_file_id)] == ["ok-1", "ok-2"]
    (line,) = read_jsonl(client, batch.error_file_id)
    assert line["custom_id"] == "bad"
    assert line["id"].startswith("batch_req_")
    assert line["error"] is None
    assert line["response"]["status_code"] == 400
    assert line["response"]["body"] == {
        "error": {
            "message": "This model's maximum context length is 8 tokens (scripted #fail400).",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }
    assert client.files.retrieve(batch.error_file_id).purpose == "batch_output"


def test_upstream_500_is_retried_until_it_succeeds(
    client: OpenAI, upstream: UpstreamProcess
) -> None:
    text = unique("flaky #fail500:2")
    batch = run_batch(client, [chat_line("flaky", text)])
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 0)
    assert batch.error_file_id is None
    assert batch.output_file_id is not None
    (line,) = read_jsonl(client, batch.output_file_id)
    assert line["response"]["status_code"] == 200
    assert line["response"]["body"]["choices"][0]["message"]["content"] == f"echo: {text}"
    assert upstream.stats()["by_text"][text] == 3


def test_upstream_429_is_honoured_and_retried(client: OpenAI, upstream: UpstreamProcess) -> None:
    text = unique("busy #fail429:1:1")  # one 429 with Retry-After: 1
    started = time.monotonic()
    batch = run_batch(client, [chat_line("busy", text)])
    elapsed = time.monotonic() - started
    assert batch.status == "completed", batch
    # Retry-After is a floor on the wait before the second attempt
    assert elapsed >= 1.0
    assert batch.completed_at is not None and batch.in_progress_at is not None
    assert batch.completed_at - batch.in_progress_at >= 1
    assert batch.error_file_id is None
    assert batch.output_file_id is not None
    (line,) = read_jsonl(client, batch.output_file_id)
    assert line["custom_id"] == "busy"
    assert line["response"]["status_code"] == 200
    assert upstream.stats()["by_text"][text] == 2


def test_all_requests_failing_is_completed_without_output_file(client: OpenAI) -> None:
    lines = [chat_line(f"f{i}", unique(f"doomed {i} #fail400")) for i in range(4)]
    batch = run_batch(client, lines)
    assert batch.status == "completed", batch
    assert batch.output_file_id is None
    assert batch.error_file_id is not None
    assert batch.request_counts is not None
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (4, 0, 4)
    errors = read_jsonl(client, batch.error_file_id)
    assert [e["custom_id"] for e in errors] == ["f0", "f1", "f2", "f3"]
    assert all(e["response"]["status_code"] == 400 for e in errors)
    assert batch.usage is not None and batch.usage.total_tokens == 0
