"""Output and error lines in the OpenAI batch format, and the segment records that carry them.

A segment is an append-only object of finished results. Each record is
`<line_no> <o|e> <json line>\n`: the 1-based input line number (unique per request, the key for
exactly-once merging and input-order output), which file the line goes to (output or error), and
the line itself, ready to copy into the final file.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import orjson

from backfill.domain import exact_json
from backfill.domain.ids import new_request_id
from backfill.domain.records import Usage
from backfill.errors import error_body


class ResultKind(bytes, Enum):
    """Which file a result line goes to, as its byte in a segment record. The members are
    bytes, so a record is built by plain `%` formatting and read back by a dict lookup."""

    OUTPUT = b"o"
    ERROR = b"e"


OUTPUT = ResultKind.OUTPUT
ERROR = ResultKind.ERROR


def usage_from_body(body: Any) -> Usage:
    """Token usage of one response body (chat, completions, embeddings, responses)."""
    if not isinstance(body, dict):
        return Usage()
    u = body.get("usage")
    if not isinstance(u, dict):
        return Usage()
    inp = u.get("prompt_tokens", u.get("input_tokens", 0)) or 0
    out = u.get("completion_tokens", u.get("output_tokens", 0)) or 0
    in_det = u.get("prompt_tokens_details") or u.get("input_tokens_details") or {}
    out_det = u.get("completion_tokens_details") or u.get("output_tokens_details") or {}
    cached = in_det.get("cached_tokens", 0) if isinstance(in_det, dict) else 0
    reasoning = out_det.get("reasoning_tokens", 0) if isinstance(out_det, dict) else 0
    try:
        return Usage(int(inp), int(cached or 0), int(out), int(reasoning or 0))
    except (TypeError, ValueError):
        return Usage()


def response_line(
    custom_id: str, status: int, body: Any, request_id: str | None, raw: bytes = b""
) -> bytes:
    """A line for a request that got an HTTP answer (output file if 2xx, else error file).

    An answer nested deeper than orjson writes (254 levels; it reads 1024) is spliced in as the
    upstream wrote it (`raw`, valid JSON by then), its line breaks turned into spaces: outside
    strings they are whitespace, and inside them JSON allows none."""
    rid = request_id or new_request_id().replace("batch_req_", "req_")
    line = {
        "id": new_request_id(),
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": rid, "body": body},
        "error": None,
    }
    try:
        return exact_json.dumps(line)
    except orjson.JSONEncodeError:
        if not raw:
            raise
    line["response"] = {"status_code": status, "request_id": rid, "body": None}
    head, _, tail = orjson.dumps(line).rpartition(b'"body":null')
    flat = raw.strip().replace(b"\r\n", b" ").replace(b"\n", b" ").replace(b"\r", b" ")
    return head + b'"body":' + flat + tail


def error_line(custom_id: str, code: str, message: str) -> bytes:
    """A line for a request that never produced a response."""
    return orjson.dumps(
        {
            "id": new_request_id(),
            "custom_id": custom_id,
            "response": None,
            "error": {"code": code, "message": message},
        }
    )


def parse_body(raw: bytes, status: int) -> Any:
    """The engine's body as JSON; a non-JSON body is wrapped in an OpenAI error object."""
    try:
        return exact_json.loads(raw)
    except orjson.JSONDecodeError:
        text = raw[:2000].decode("utf-8", "replace")
        return error_body(
            f"upstream answered {status} with a non-JSON body: {text}", "upstream_error"
        )


def segment_record(line_no: int, kind: ResultKind, line: bytes) -> bytes:
    return b"%d %s %s\n" % (line_no, kind, line)


CANCELLED_MESSAGE = "The batch was cancelled before this request ran."
EXPIRED_MESSAGE = "The batch expired before this request ran."
