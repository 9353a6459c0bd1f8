"""Completion windows: `"24h"`, `"90m"`, `"7d"`, `"3600s"` parsed to seconds.

Strict, like OpenAI (which takes `"24h"` and nothing else): ASCII digits without a leading zero,
then one lowercase unit, nothing around them. `" 24h"`, `"24 h"`, `"24H"` and full-width digits
(which a Unicode `[0-9]` class and `int()` would take) are refused. At most nine digits, so the
number stays small and the stored text fits its column.
"""

from __future__ import annotations

import re

from backfill.errors import InvalidRequest

_WINDOW = re.compile(r"(0|[1-9][0-9]{0,8})([smhd])", re.ASCII)
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_window(text: str, *, min_seconds: int, max_seconds: int) -> int:
    """Seconds in `text`. `24h` is always accepted; others must lie within the range."""
    m = _WINDOW.fullmatch(text) if isinstance(text, str) else None
    if not m:
        raise InvalidRequest(
            f"Invalid completion_window {text!r}: use a duration such as '24h', '90m' or '7d'.",
            param="completion_window",
            code="invalid_completion_window",
        )
    seconds = int(m.group(1)) * _UNIT[m.group(2)]
    if seconds == 86400:
        return seconds
    if not min_seconds <= seconds <= max_seconds:
        raise InvalidRequest(
            f"completion_window {text!r} is outside the allowed range "
            f"({min_seconds}s to {max_seconds}s).",
            param="completion_window",
            code="invalid_completion_window",
        )
    return seconds
