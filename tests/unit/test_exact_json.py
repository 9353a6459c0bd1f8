"""Numbers in request bodies keep their exact value from the input line to the upstream's bytes
(`domain/exact_json.py`), and completion windows are as strict as OpenAI's."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import orjson
import pytest

from backfill.domain import exact_json
from backfill.domain.exact_json import ExactFloat
from backfill.domain.inputs import iter_requests
from backfill.domain.validation import InputValidator, ValidationLimits
from backfill.domain.windows import parse_window
from backfill.errors import InvalidRequest

CHAT = "/v1/chat/completions"

#: numbers orjson alone changes (or refuses), as written in a request
TRICKY = [
    "18446744073709551616",  # 2**64: orjson reads 1.8446744073709552e+19
    "-9223372036854775809",  # one below int64
    "123456789012345678901234567890",
    "0.1000000000000000000001",  # more digits than a double holds
    "3.141592653589793238462643383279",
    "1e400",  # beyond a double: orjson refuses the line
    "-1e-400",  # below a double: orjson would read 0.0
    "12345678.123456789",
]
#: numbers a double holds exactly: the fast path, unchanged in value
PLAIN = ["0", "-7", "42", "1.5", "0.1", "-2.25e-5", "1e5", "18446744073709551615", "1.1e100"]


def number_texts(data: bytes) -> list[str]:
    """The numbers of a JSON document exactly as its bytes spell them."""
    found: list[str] = []
    json.loads(data, parse_int=found.append, parse_float=found.append)  # type: ignore[arg-type]
    return found


def same_value(a: str, b: str) -> bool:
    return Decimal(a) == Decimal(b)


@pytest.mark.parametrize("text", TRICKY + PLAIN)
def test_numbers_round_trip_with_their_exact_value(text: str) -> None:
    raw = b'{"model": "m", "seed": %s, "nested": [{"x": %s}]}' % (text.encode(), text.encode())
    body = exact_json.loads(raw)
    out = exact_json.dumps(body)
    assert [same_value(n, text) for n in number_texts(out)] == [True, True], out


def test_orjson_alone_loses_them() -> None:
    """What this module is for: the plain orjson round trip changes every tricky number."""
    for text in TRICKY:
        raw = b'{"seed": %s}' % text.encode()
        try:
            out = orjson.dumps(orjson.loads(raw))
        except orjson.JSONDecodeError:
            continue  # refused outright (1e400)
        assert not same_value(number_texts(out)[0], text), text


def test_types_seen_by_in_process_engines() -> None:
    body = exact_json.loads(
        b'{"a": 18446744073709551616, "b": 0.1000000000000000000001, "c": 1e400, "d": 1.5}'
    )
    assert body["a"] == 2**64 and type(body["a"]) is int
    assert isinstance(body["b"], ExactFloat) and body["b"] == 0.1
    assert body["c"] == float("inf") and body["c"].text == "1e400"
    assert type(body["d"]) is float


def test_long_digit_strings_take_the_exact_path_and_stay_strings() -> None:
    raw = '{"custom_id": "1234567890123456789", "t": "e1000 café"}'.encode()
    assert exact_json.loads(raw) == {"custom_id": "1234567890123456789", "t": "e1000 café"}


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a": NaN, "n": 12345678901234567}',
        b'{"a": Infinity, "n": 12345678901234567}',
        b'{"a": "\\ud800", "n": 12345678901234567}',  # a lone surrogate
        b'{"a": "\xff", "n": 12345678901234567}',  # not UTF-8
        b'{"a": 1e400',
        b'{"n": 1' + b"0" * 5000 + b"}",  # beyond Python's int-from-text limit
    ],
)
def test_the_exact_path_refuses_what_orjson_refuses(raw: bytes) -> None:
    with pytest.raises(orjson.JSONDecodeError):
        exact_json.loads(raw)


def test_dumps_keeps_orjson_output_for_ordinary_bodies() -> None:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hé"}], "n": 1}
    assert exact_json.dumps(body) == orjson.dumps(body)
    wide = {"big": 2**70, "list": [2**64, -(2**63) - 1, True], "ok": 5}
    assert exact_json.dumps(wide) == (
        b'{"big":1180591620717411303424,"list":[18446744073709551616,-9223372036854775809,'
        b'true],"ok":5}'
    )


def test_validation_and_the_worker_read_bodies_the_same_way() -> None:
    """A line orjson refuses (1e400) is valid, and its body reaches the engine exactly."""
    line = (
        b'{"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": '
        b'{"model": "m", "messages": [], "seed": 18446744073709551616, "temperature": 1e400}}\n'
    )
    validator = InputValidator(
        batch_id="b", endpoint=CHAT, served={"m": frozenset({CHAT})}, limits=ValidationLimits()
    )
    validator.feed(line)
    result = validator.finish()
    assert result.ok and result.total == 1, result.errors

    async def read() -> list[tuple[int, str, dict[str, Any]]]:
        async def lines() -> AsyncIterator[bytes]:
            for raw in line.split(b"\n"):
                yield raw

        return [request async for request in iter_requests(lines(), 1)]

    [(line_no, custom_id, body)] = asyncio.run(read())
    assert (line_no, custom_id) == (1, "r1")
    assert exact_json.dumps(body) == (
        b'{"model":"m","messages":[],"seed":18446744073709551616,"temperature":1e400}'
    )


@pytest.mark.parametrize(
    ("text", "seconds"), [("24h", 86400), ("1h", 3600), ("90m", 5400), ("7d", 604800)]
)
def test_windows_openai_accepts(text: str, seconds: int) -> None:
    assert parse_window(text, min_seconds=3600, max_seconds=7 * 86400) == seconds


@pytest.mark.parametrize(
    "text",
    [" 24h", "24 h", "24h ", "\t24h", "24h\n", "\uff12\uff14h", "\uff124h", "24H", "024h", "+24h"],
)
def test_windows_are_strict(text: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_window(text, min_seconds=3600, max_seconds=7 * 86400)
    assert info.value.param == "completion_window"


def test_window_with_thousands_of_digits_is_a_400_not_a_crash() -> None:
    with pytest.raises(InvalidRequest):
        parse_window("9" * 5000 + "h", min_seconds=3600, max_seconds=7 * 86400)
