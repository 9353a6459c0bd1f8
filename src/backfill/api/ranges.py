"""HTTP `Range` requests on file content: one byte range, per RFC 9110 section 14.

We serve a single range (`bytes=a-b`, `bytes=a-`, `bytes=-n`), which is what download tools and
resumable clients send. Anything we do not understand (another unit, several ranges, bad
syntax) is ignored and the whole file is sent with 200, as the RFC allows. A well-formed range
that starts beyond the end of the file is answered with 416 and `Content-Range: bytes */size`.
"""

from __future__ import annotations

from backfill.errors import RangeNotSatisfiable


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """`(start, end)` (end exclusive) of the requested range, or None to send everything."""
    if not header:
        return None
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if not dash or (first and not first.isdigit()) or (last and not last.isdigit()):
        return None
    if not first:
        if not last:
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(header, size)
        return max(0, size - suffix), size
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable(header, size)
    end = min(int(last) + 1, size) if last else size
    return start, end
