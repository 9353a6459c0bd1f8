"""A batch end to end through the official SDK: upload, create, poll, download, check everything."""

from __future__ import annotations

import pytest
from openai import OpenAI
from sdk_helpers import (
    COMPLETIONS,
    EMBEDDINGS,
    chat_line,
    completion_line,
    embedding_line,
    read_jsonl,
    run_batch,
    words,
)


def test_chat_batch_round_trip(client: OpenAI) -> None:
    contents = [f"hello number {i}" + " word" * i for i in range(8)]
    ids = [f"req-{i:02d}" for i in range(8)]
    batch = run_batch(client, [chat_line(c, t) for c, t in zip(ids, contents, strict=True)])

    assert batch.status == "completed", batch
    assert batch.model == "m"
    assert batch.errors is None
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed) == (8, 8)
    assert batch.request_counts.failed == 0
    assert batch.error_file_id is None
    assert batch.output_file_id is not None

    # upstream counts words: prompt = words of the messages, completion = words of the reply
    prompt_tokens = sum(words(t) for t in contents)
    completion_tokens = sum(words("echo: " + t) for t in contents)
    assert batch.usage is not None
    assert batch.usage.input_tokens == prompt_tokens
    assert batch.usage.output_tokens == completion_tokens
    assert batch.usage.total_tokens == prompt_tokens + completion_tokens
    assert batch.usage.input_tokens_details.cached_tokens == 0
    assert batch.usage.output_tokens_details.reasoning_tokens == 0

    assert batch.in_progress_at is not None
    assert batch.finalizing_at is not None
    assert batch.completed_at is not None
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at
    assert batch.failed_at is None and batch.cancelled_at is None and batch.expired_at is None

    out_file = client.files.retrieve(batch.output_file_id)
    assert out_file.purpose == "batch_output"
    assert out_file.status == "processed"
    raw = client.files.content(batch.output_file_id).content
    assert out_file.bytes == len(raw)

    lines = read_jsonl(client, batch.output_file_id)
    assert [line["custom_id"] for line in lines] == ids
    request_ids = set()
    for line, text in zip(lines, contents, strict=True):
        assert line["id"].startswith("batch_req_")
        request_ids.add(line["id"])
        assert line["error"] is None
        assert line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["model"] == "m"
        assert body["choices"][0]["message"]["content"] == f"echo: {text}"
        assert body["usage"]["prompt_tokens"] == words(text)
        assert body["usage"]["completion_tokens"] == words("echo: " + text)
    assert len(request_ids) == len(ids)


def test_completions_batch_round_trip(client: OpenAI) -> None:
    prompts = ["once upon a time", "the end", "x y z w"]
    lines = [completion_line(f"c{i}", p) for i, p in enumerate(prompts)]
    batch = run_batch(client, lines, endpoint=COMPLETIONS)

    assert batch.status == "completed", batch
    assert batch.endpoint == COMPLETIONS
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed) == (3, 3)
    assert batch.error_file_id is None
    assert batch.usage is not None
    assert batch.usage.input_tokens == sum(words(p) for p in prompts)
    assert batch.usage.output_tokens == sum(words("echo: " + p) for p in prompts)
    assert batch.output_file_id is not None
    out = read_jsonl(client, batch.output_file_id)
    assert [o["custom_id"] for o in out] == ["c0", "c1", "c2"]
    for o, p in zip(out, prompts, strict=True):
        assert o["response"]["status_code"] == 200
        assert o["response"]["body"]["object"] == "text_completion"
        assert o["response"]["body"]["choices"][0]["text"] == f"echo: {p}"


def test_embeddings_batch_round_trip(client: OpenAI) -> None:
    texts = ["alpha beta", "gamma", "delta epsilon zeta"]
    lines = [embedding_line(f"e{i}", t) for i, t in enumerate(texts)]
    batch = run_batch(client, lines, endpoint=EMBEDDINGS)

    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed) == (3, 3)
    assert batch.usage is not None
    assert batch.usage.input_tokens == sum(words(t) for t in texts)
    assert batch.usage.output_tokens == 0
    assert batch.output_file_id is not None
    out = read_jsonl(client, batch.output_file_id)
    assert [o["custom_id"] for o in out] == ["e0", "e1", "e2"]
    for o in out:
        body = o["response"]["body"]
        assert body["object"] == "list"
        assert len(body["data"]) == 1
        assert body["data"][0]["object"] == "embedding"
        assert len(body["data"][0]["embedding"]) == 8


@pytest.mark.parametrize("content", ["héllo wörld ✓", "multi\nline\ttext"])
def test_unicode_and_escapes_survive(client: OpenAI, content: str) -> None:
    batch = run_batch(client, [chat_line("u", content)])
    assert batch.status == "completed", batch
    assert batch.output_file_id is not None
    (line,) = read_jsonl(client, batch.output_file_id)
    assert line["response"]["body"]["choices"][0]["message"]["content"] == f"echo: {content}"
