"""Problems inside the input file: the batch is created, then fails with every error by line."""

from __future__ import annotations

import json

from openai import OpenAI
from openai.types import Batch
from sdk_helpers import CHAT, chat_line, jsonl, read_jsonl, upload, wait_batch
from suite_settings import MAX_REQUESTS, MAX_TOKENS


def codes_and_lines(batch: Batch) -> list[tuple[str | None, int | None]]:
    assert batch.errors is not None and batch.errors.data is not None, batch
    return [(e.code, e.line) for e in batch.errors.data]


def create(client: OpenAI, data: bytes) -> Batch:
    file = upload(client, data)
    batch = client.batches.create(input_file_id=file.id, endpoint=CHAT, completion_window="24h")
    assert batch.status == "validating"
    return wait_batch(client, batch.id)


def assert_failed_cleanly(batch: Batch) -> None:
    assert batch.status == "failed", batch
    assert batch.failed_at is not None
    assert batch.in_progress_at is None
    assert batch.output_file_id is None
    assert batch.error_file_id is None
    assert batch.errors is not None and batch.errors.object == "list"
    for error in batch.errors.data or []:
        assert error.message


def test_every_line_error_is_reported_with_its_line(client: OpenAI) -> None:
    good = chat_line("a", "fine")
    no_custom_id = {k: v for k, v in chat_line("x", "x").items() if k != "custom_id"}
    no_body = {k: v for k, v in chat_line("nb", "x").items() if k != "body"}
    lines: list[dict[str, object] | str] = [
        good,  # 1
        "this is not json",  # 2
        "[1, 2, 3]",  # 3: JSON, but not an object
        no_custom_id,  # 4
        {**chat_line("get", "x"), "method": "GET"},  # 5
        chat_line("stream", "x", stream=True),  # 6
        {**chat_line("url", "x"), "url": "/v1/completions"},  # 7
        chat_line("a", "duplicate of line 1"),  # 8
        chat_line("unknown-model", "x", model="no-such-model"),  # 9
        chat_line("other-model", "x", model="m2"),  # 10
        "",  # 11: blank, ignored
        no_body,  # 12
        {**chat_line("x", "x"), "custom_id": 17},  # 13: wrong type
        chat_line("b", "fine too"),  # 14
    ]
    batch = create(client, jsonl(lines))

    assert_failed_cleanly(batch)
    assert codes_and_lines(batch) == [
        ("invalid_json_line", 2),
        ("invalid_json_line", 3),
        ("missing_required_parameter", 4),
        ("invalid_request", 5),
        ("invalid_request", 6),
        ("url_mismatch", 7),
        ("duplicate_custom_id", 8),
        ("model_not_found", 9),
        ("model_mismatch", 10),
        ("missing_required_parameter", 12),
        ("invalid_request", 13),
    ]


def test_empty_file_fails(client: OpenAI) -> None:
    batch = create(client, b"\n  \n\n")
    assert_failed_cleanly(batch)
    assert codes_and_lines(batch) == [("empty_file", None)]


def test_zero_byte_file_fails(client: OpenAI) -> None:
    batch = create(client, b"")
    assert_failed_cleanly(batch)
    assert codes_and_lines(batch) == [("empty_file", None)]


def test_too_many_tasks(client: OpenAI) -> None:
    lines = [chat_line(f"r{i}", "x") for i in range(MAX_REQUESTS + 2)]
    batch = create(client, jsonl(lines))
    assert_failed_cleanly(batch)
    assert codes_and_lines(batch) == [("too_many_tasks", MAX_REQUESTS + 1)]


def test_exactly_the_request_limit_is_accepted(client: OpenAI) -> None:
    lines = [chat_line(f"r{i}", "x") for i in range(MAX_REQUESTS)]
    batch = create(client, jsonl(lines))
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert batch.request_counts.completed == MAX_REQUESTS


def test_token_limit_exceeded(client: OpenAI) -> None:
    lines = [chat_line("small", "x"), chat_line("huge", "x", max_tokens=MAX_TOKENS)]
    batch = create(client, jsonl(lines))
    assert_failed_cleanly(batch)
    assert codes_and_lines(batch) == [("token_limit_exceeded", None)]


def test_blank_lines_ignored_and_bom_stripped(client: OpenAI) -> None:
    body = jsonl(["", chat_line("first", "one"), "   ", "", chat_line("second", "two"), ""])
    batch = create(client, b"\xef\xbb\xbf" + body + b"\n\n")
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed) == (2, 2)
    assert batch.output_file_id is not None
    out = read_jsonl(client, batch.output_file_id)
    assert [o["custom_id"] for o in out] == ["first", "second"]


def test_bom_on_first_request_line(client: OpenAI) -> None:
    batch = create(client, b"\xef\xbb\xbf" + jsonl([chat_line("only", "hi")]))
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert batch.request_counts.completed == 1


def test_line_numbers_count_blank_lines(client: OpenAI) -> None:
    data = b"\xef\xbb\xbf" + jsonl([chat_line("a", "x"), "", "", "{broken"])
    batch = create(client, data)
    assert_failed_cleanly(batch)
    assert codes_and_lines(batch) == [("invalid_json_line", 4)]


def test_crlf_line_endings(client: OpenAI) -> None:
    data = "\r\n".join(json.dumps(chat_line(f"r{i}", f"t{i}")) for i in range(3)).encode()
    batch = create(client, data + b"\r\n")
    assert batch.status == "completed", batch
    assert batch.output_file_id is not None
    out = read_jsonl(client, batch.output_file_id)
    assert [o["custom_id"] for o in out] == ["r0", "r1", "r2"]
