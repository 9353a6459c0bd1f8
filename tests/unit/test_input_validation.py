"""Input-file validation: every error code with its 1-based line, shards, streaming."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from backfill.domain.inputs import iter_requests
from backfill.domain.segments import iter_lines
from backfill.domain.validation import InputValidator, ValidationLimits, ValidationResult

CHAT = "/v1/chat/completions"
SERVED = {"m": frozenset({CHAT}), "other": frozenset({CHAT}), "emb": frozenset({"/v1/embeddings"})}


def req(cid: str, model: str = "m", **over: Any) -> bytes:
    obj: dict[str, Any] = {
        "custom_id": cid,
        "method": "POST",
        "url": CHAT,
        "body": {"model": model, "messages": [{"role": "user", "content": f"hi {cid}"}]},
    }
    obj.update(over)
    return orjson.dumps(obj)


def validate(data: bytes, chunk: int = 1 << 20, **limits: Any) -> ValidationResult:
    v = InputValidator(
        batch_id="batch_x", endpoint=CHAT, served=SERVED, limits=ValidationLimits(**limits)
    )
    for i in range(0, len(data), chunk):
        v.feed(data[i : i + chunk])
    return v.finish()


def read_shard(data: bytes, first_line: int, chunk: int) -> list[tuple[int, str, Any]]:
    """The worker's reading of a shard's bytes, arriving in pieces of `chunk` bytes."""

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(data), chunk):
            yield data[i : i + chunk]

    async def read() -> list[tuple[int, str, Any]]:
        return [r async for r in iter_requests(iter_lines(pieces()), first_line)]

    return asyncio.run(read())


def codes(result: ValidationResult) -> list[tuple[str, int | None]]:
    return [(e.code, e.line) for e in result.errors]


def test_valid_file_plans_shards_that_read_back_the_same_requests() -> None:
    lines = [req(f"r{i}") for i in range(7)]
    data = b"\xef\xbb\xbf" + b"\n".join(lines[:3]) + b"\n\n  \n" + b"\n".join(lines[3:]) + b"\n"
    for chunk in (1, 5, 64, 1 << 20):
        result = validate(data, chunk=chunk, shard_size=3)
        assert result.ok and result.total == 7 and result.model == "m"
        assert [s.count for s in result.shards] == [3, 3, 1]
        got = []
        for s in result.shards:
            got.extend(read_shard(data[s.start : s.end], s.first_line, chunk))
        assert [cid for _, cid, _ in got] == [f"r{i}" for i in range(7)]
        # line numbers count the blank lines
        assert [n for n, _, _ in got] == [1, 2, 3, 6, 7, 8, 9]


def test_each_error_code_is_reported_with_its_line() -> None:
    rows = [
        req("a"),  # 1 ok
        b"not json",  # 2
        b"[1, 2]",  # 3
        orjson.dumps({"method": "POST", "url": CHAT, "body": {"model": "m"}}),  # 4
        req("b", method="GET"),  # 5
        req("c", url="/v1/embeddings"),  # 6
        req("a"),  # 7 duplicate
        req("d", model="nope"),  # 8
        req("e", model="other"),  # 9 mismatch
        req("f", body={"model": "m", "stream": True}),  # 10
        req("g", custom_id=5),  # 11
        req("h", body="text"),  # 12
        orjson.dumps({"custom_id": "i", "method": "POST", "url": CHAT, "body": {}}),  # 13
        req("j", model="emb"),  # 14 served but not on this endpoint
    ]
    result = validate(b"\n".join(rows))
    assert codes(result) == [
        ("invalid_json_line", 2),
        ("invalid_json_line", 3),
        ("missing_required_parameter", 4),
        ("invalid_request", 5),
        ("url_mismatch", 6),
        ("duplicate_custom_id", 7),
        ("model_not_found", 8),
        ("model_mismatch", 9),
        ("invalid_request", 10),
        ("invalid_request", 11),
        ("invalid_request", 12),
        ("missing_required_parameter", 13),
        ("model_not_found", 14),
    ]
    assert result.errors[2].param == "custom_id"
    assert result.errors[8].param == "body.stream"
    assert result.shards == []


def test_empty_and_blank_files() -> None:
    assert codes(validate(b"")) == [("empty_file", None)]
    assert codes(validate(b"\n \n\n")) == [("empty_file", None)]


def test_too_many_tasks_reported_once_at_the_first_line_over() -> None:
    data = b"\n".join(req(f"r{i}") for i in range(5))
    assert codes(validate(data, max_requests=3)) == [("too_many_tasks", 4)]


def test_error_cap() -> None:
    data = b"\n".join(b"junk" for _ in range(50))
    result = validate(data, max_errors=10)
    assert len(result.errors) == 10
    assert result.errors[-1].line == 10


def test_token_quota() -> None:
    data = b"\n".join(req(f"r{i}") for i in range(10))
    assert codes(validate(data, max_enqueued_tokens=20)) == [("token_limit_exceeded", None)]
    assert validate(data, max_enqueued_tokens=10_000).ok


def test_over_long_line_is_reported_without_holding_it() -> None:
    data = req("a") + b"\n" + b"x" * 5000 + b"\n" + req("b")
    for chunk in (100, 1 << 20):
        result = validate(data, chunk=chunk, max_line_bytes=1000)
        assert codes(result) == [("invalid_request", 2)]


@pytest.mark.parametrize("crlf", [False, True])
def test_crlf_line_endings(crlf: bool) -> None:
    sep = b"\r\n" if crlf else b"\n"
    data = sep.join(req(f"r{i}") for i in range(3)) + sep
    result = validate(data, shard_size=2)
    assert result.ok and result.total == 3


def test_bodies_nested_deeper_than_any_writer_handles_are_refused() -> None:
    import json

    def line(cid: str, levels: int, text: str = "hi") -> bytes:
        nested: Any = {}
        for _ in range(levels):
            nested = {"a": nested}
        body = {"model": "m", "messages": [{"role": "user", "content": text}], "x": nested}
        obj = {"custom_id": cid, "method": "POST", "url": CHAT, "body": body}
        return json.dumps(obj).encode()

    data = b"\n".join([line("ok", 300), line("deep", 600), line("brackets-in-text", 1, "{[" * 600)])
    result = validate(data)
    assert codes(result) == [("invalid_request", 2)]
    assert result.errors[0].param == "body"


@pytest.mark.parametrize("endpoint", ["/v1/responses", "/v1/moderations"])
def test_responses_and_moderations_lines_need_input_and_a_model_serving_them(
    endpoint: str,
) -> None:
    served = {"up": frozenset({endpoint}), "m": frozenset({CHAT})}

    def line(cid: str, body: dict[str, Any]) -> bytes:
        return orjson.dumps({"custom_id": cid, "method": "POST", "url": endpoint, "body": body})

    data = b"\n".join(
        [
            line("ok", {"model": "up", "input": "hello"}),
            line("ok2", {"model": "up", "input": [{"role": "user", "content": "hi"}]}),
            line("no-input", {"model": "up"}),
            line("bad-input", {"model": "up", "input": 3}),
            line("empty", {"model": "up", "input": []}),
            line("no-model", {"input": "x"}),
            line("not-served", {"model": "m", "input": "x"}),
        ]
    )
    v = InputValidator(
        batch_id="batch_x", endpoint=endpoint, served=served, limits=ValidationLimits()
    )
    v.feed(data)
    result = v.finish()
    assert [(e.code, e.line, e.param) for e in result.errors] == [
        ("missing_required_parameter", 3, "body.input"),
        ("invalid_request", 4, "body.input"),
        ("invalid_request", 5, "body.input"),
        ("missing_required_parameter", 6, "body.model"),
        ("model_not_found", 7, "body.model"),
    ]
    assert f"does not serve {endpoint}" in result.errors[-1].message
    assert result.total == 2
