"""Output/error line builders, usage extraction, segment records and their merge."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson

from backfill.domain.finalize import result_file_id
from backfill.domain.records import Usage
from backfill.domain.results import (
    ERROR,
    OUTPUT,
    error_line,
    parse_body,
    response_line,
    segment_record,
    usage_from_body,
)
from backfill.domain.segments import index_shard, parse_record, shard_lines
from backfill.domain.statuses import BatchStatus, can_transition, sources_of
from backfill.domain.windows import parse_window


def test_response_line_shape() -> None:
    line = orjson.loads(response_line("c1", 200, {"x": 1}, "req_1"))
    assert line["id"].startswith("batch_req_")
    assert line["custom_id"] == "c1"
    assert line["response"] == {"status_code": 200, "request_id": "req_1", "body": {"x": 1}}
    assert line["error"] is None


def test_error_line_shape() -> None:
    line = orjson.loads(error_line("c2", "batch_cancelled", "gone"))
    assert line["response"] is None
    assert line["error"] == {"code": "batch_cancelled", "message": "gone"}


def test_usage_from_chat_and_embeddings() -> None:
    chat = {
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 4},
            "completion_tokens_details": {"reasoning_tokens": 2},
        }
    }
    assert usage_from_body(chat) == Usage(10, 4, 5, 2)
    assert usage_from_body({"usage": {"prompt_tokens": 7, "total_tokens": 7}}) == Usage(7)
    assert usage_from_body({"no": "usage"}) == Usage()
    assert usage_from_body([1]) == Usage()
    assert (Usage(1, 0, 2) + Usage(3, 1, 4)).total_tokens == 10


def test_non_json_body_is_wrapped_as_an_error() -> None:
    body = parse_body(b"<html>bad gateway</html>", 502)
    assert "bad gateway" in body["error"]["message"]


def test_segments_merge_first_record_wins() -> None:
    seg1 = segment_record(3, OUTPUT, b'{"a":1}') + segment_record(1, ERROR, b'{"b":2}')
    seg2 = segment_record(3, OUTPUT, b'{"a":"dup"}') + segment_record(2, OUTPUT, b'{"c":3}')
    assert [parse_record(r) for r in seg1.split(b"\n") if r] == [
        (3, OUTPUT, b'{"a":1}'),
        (1, ERROR, b'{"b":2}'),
    ]

    class Segments:
        def __init__(self, data: dict[str, bytes]) -> None:
            self.data = data

        async def stream(
            self, path: str, start: int = 0, end: int | None = None, chunk_size: int = 1 << 20
        ) -> AsyncIterator[bytes]:
            yield self.data[path][start:end]

        async def get_range(self, path: str, start: int, end: int) -> bytes:
            return self.data[path][start:end]

    async def merge() -> tuple[list[int], bytes, bytes]:
        source, paths = Segments({"s1": seg1, "s2": seg2}), ["s1", "s2"]
        index = await index_shard(source, paths)
        out = b"".join([c async for c in shard_lines(source, paths, index, OUTPUT)])
        err = b"".join([c async for c in shard_lines(source, paths, index, ERROR)])
        return sorted(index.places), out, err

    lines, out, err = asyncio.run(merge())
    assert lines == [1, 2, 3]
    assert out == b'{"c":3}\n{"a":1}\n'  # input order; the first record of line 3 wins
    assert err == b'{"b":2}\n'


def test_result_file_ids_are_deterministic_and_distinct() -> None:
    assert result_file_id("batch_1", "output") == result_file_id("batch_1", "output")
    assert result_file_id("batch_1", "output") != result_file_id("batch_1", "error")
    assert result_file_id("batch_1", "output").startswith("file-")


def test_transitions_as_data() -> None:
    S = BatchStatus
    assert can_transition(S.VALIDATING, S.IN_PROGRESS)
    assert not can_transition(S.COMPLETED, S.CANCELLING)
    assert sources_of(S.CANCELLING) == {S.VALIDATING, S.IN_PROGRESS, S.FINALIZING}


def test_windows() -> None:
    assert parse_window("24h", min_seconds=7200, max_seconds=7200) == 86400
    assert parse_window("90m", min_seconds=3600, max_seconds=86400 * 7) == 5400
    for bad in ("1x", "", "h24", "10s"):
        try:
            parse_window(bad, min_seconds=3600, max_seconds=86400 * 7)
        except Exception as exc:
            assert getattr(exc, "param", None) == "completion_window"
        else:
            raise AssertionError(bad)


def test_an_answer_deeper_than_orjson_writes_is_spliced_in_as_sent() -> None:
    import json

    levels = 600  # orjson reads 1024 levels and writes 254
    raw = b'{"x":\n' + b'{"a":\r\n' * levels + b"{}" + b"}" * levels + b"}"
    body = parse_body(raw, 200)
    line = response_line("deep", 200, body, "req_1", raw)
    assert b"\n" not in line and b"\r" not in line
    value = json.loads(line)["response"]["body"]["x"]
    depth = 0
    while value:
        value, depth = value["a"], depth + 1
    assert depth == levels
