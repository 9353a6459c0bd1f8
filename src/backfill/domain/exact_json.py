"""JSON whose numbers reach the upstream with the exact value the user wrote.

orjson, the hot path, reads an integer beyond 64 bits as a float (18446744073709551616 becomes
1.8446744073709552e+19), a decimal with more digits than a double holds as the nearest double
(0.1000000000000000000001 becomes 0.1), a number beyond a double's range not at all (1e400), and
writes no integer beyond 64 bits. A request body is the user's, so it must not be changed on
its way through:

- `loads` scans the bytes for a number orjson could change (`_risky`: a run of 16 or more
  digits and dots, or a digit or dot, an `e` and a three-digit exponent). Any other number has
  at most 15 significant digits and a magnitude well inside a double's range, so a double holds
  its value exactly and orjson reads the line (the fast path, nearly every line). The scan is
  one `bytes.translate` (digits and dots to `0`) and three substring searches, about 2 ns a
  byte: a regular expression was ten times slower. A line that matches (or holds something that
  only looks like such a number, e.g. a long digit string: a false alarm costs speed, never
  correctness) is read by the standard library instead: integers as Python ints
  (exact at any size), decimals as floats when the float's shortest form has the same value, and
  otherwise as `ExactFloat`, a float that remembers its text.
- `dumps` writes with orjson; an `ExactFloat` goes out as its text (`orjson.Fragment`), and when
  orjson refuses an integer beyond 64 bits, those are written as fragments on a second try.

Values are kept, not spellings: `1E2` still goes out as `100.0`, which is the same number. The
slow path accepts exactly what orjson accepts otherwise: no `NaN`/`Infinity`, strict UTF-8, no
lone surrogates, and it raises `orjson.JSONDecodeError` like the fast path.
"""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal
from typing import Any

import orjson

__all__ = ["ExactFloat", "dumps", "loads"]

#: digits and dots -> `0`, `e`/`E` -> `e`, signs -> `s`, anything else -> space
_CLASSES = bytes(
    ord("0") if c in b"0123456789." else ord("e") if c in b"eE" else ord("s") if c in b"+-" else 32
    for c in range(256)
)
#: a `\uD800`-`\uDFFF` escape: a surrogate, maybe a lone one (orjson refuses those)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_INT_MIN = -(1 << 63)
_INT_MAX = (1 << 64) - 1


class ExactFloat(float):
    """A JSON number no double holds exactly: reads as the nearest float (or an infinity),
    writes back as the text it was read from."""

    text: str

    def __new__(cls, text: str) -> ExactFloat:
        self = super().__new__(cls, text)
        self.text = text
        return self

    def __repr__(self) -> str:
        return f"ExactFloat({self.text!r})"


def loads(data: bytes) -> Any:
    """Parse one JSON document, keeping every number's value (see the module doc)."""
    if not _risky(data):
        return orjson.loads(data)
    return _loads_exact(data)


def _risky(data: bytes) -> bool:
    """May `data` hold a number orjson would change? (False alarms are fine.)"""
    classes = data.translate(_CLASSES)
    return b"0" * 16 in classes or b"0e000" in classes or b"0es000" in classes


def _loads_exact(data: bytes) -> Any:
    try:
        text = data.decode("utf-8")
        value = json.loads(text, parse_float=_decimal, parse_constant=_no_constant)
        if _SURROGATE_ESCAPE.search(data):
            _check_strings(value)
    except json.JSONDecodeError as exc:
        raise orjson.JSONDecodeError(exc.msg, exc.doc, exc.pos) from None
    except (ValueError, RecursionError) as exc:  # bad UTF-8, a surrogate, a 5000-digit integer
        raise orjson.JSONDecodeError(f"invalid JSON: {exc}", "", 0) from None
    return value


def _decimal(text: str) -> float:
    value = float(text)
    if math.isfinite(value) and Decimal(repr(value)) == Decimal(text):
        return value
    return ExactFloat(text)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _check_strings(value: Any) -> None:
    """Raise ValueError on a string that is not valid Unicode (a lone surrogate)."""
    if isinstance(value, str):
        value.encode("utf-8")
    elif isinstance(value, dict):
        for key, item in value.items():
            key.encode("utf-8")
            _check_strings(item)
    elif isinstance(value, list):
        for item in value:
            _check_strings(item)


def dumps(obj: Any) -> bytes:
    """Serialize with orjson, writing `ExactFloat`s and integers beyond 64 bits as written.
    A value nested deeper than orjson writes (254 levels, though it reads 1024) goes through
    the standard library instead (an `ExactFloat` there is written as its nearest double)."""
    try:
        return orjson.dumps(obj, default=_default)
    except orjson.JSONEncodeError:
        try:
            wide = _widen(obj)
        except RecursionError:  # deeper than Python recurses: no writer here can do it
            raise orjson.JSONEncodeError("Recursion limit reached") from None
        if wide is not obj:
            try:
                return orjson.dumps(wide, default=_default)
            except orjson.JSONEncodeError:
                pass
        return _dumps_deep(obj)


def _dumps_deep(obj: Any) -> bytes:
    try:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (RecursionError, ValueError, TypeError) as exc:
        raise orjson.JSONEncodeError(str(exc)) from None
    return text.encode("utf-8")


def _default(value: Any) -> Any:
    if isinstance(value, ExactFloat):
        return orjson.Fragment(value.text)
    raise TypeError(f"Type is not JSON serializable: {type(value).__name__}")


def _widen(value: Any) -> Any:
    """`value` with integers outside orjson's range as fragments (the same object if none)."""
    if type(value) is int:
        return orjson.Fragment(str(value)) if not _INT_MIN <= value <= _INT_MAX else value
    if isinstance(value, dict):
        items = {key: _widen(item) for key, item in value.items()}
        changed = any(items[key] is not item for key, item in value.items())
        return items if changed else value
    if isinstance(value, list):
        out = [_widen(item) for item in value]
        return out if any(a is not b for a, b in zip(out, value, strict=True)) else value
    return value
