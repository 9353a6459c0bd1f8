"""The one way tests wait: poll a probe until it is done, with a deadline.

No sleeps as synchronization (DESIGN.md, Tests): a test that waits for something calls the
probe every `interval` seconds until `done(value)` holds (the value's truthiness without a
`done`) and gets the value back; at the deadline it fails with an `AssertionError` naming what
it waited for and the last value seen. Without `what`, the probe's own source (the lambda at
the call site) names it, so a one-line `poll(lambda: engine.active == 3)` still says what hung.

`poll` blocks (threads, subprocesses, HTTP clients); `poll_async` yields to the event loop
between probes, and takes probes that return awaitables too. `interval=0` polls on every turn
of the loop, for unit tests whose fakes answer at once. The default deadline is generous:
2-core CI machines are noisy, and a deadline only costs time when a test is failing anyway.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

TIMEOUT = 60.0
INTERVAL = 0.05


def poll(
    probe: Callable[[], T],
    done: Callable[[T], object] | None = None,
    *,
    what: str | None = None,
    timeout: float = TIMEOUT,
    interval: float = INTERVAL,
) -> T:
    """Call `probe` until `done(value)` (or `value` itself) is true; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if done(value) if done is not None else value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(_timed_out(probe, what, timeout, value))
        time.sleep(interval)


async def poll_async(
    probe: Callable[[], T | Awaitable[T]],
    done: Callable[[T], object] | None = None,
    *,
    what: str | None = None,
    timeout: float = TIMEOUT,
    interval: float = INTERVAL,
) -> T:
    """`poll` for a running event loop: sleeps with `asyncio.sleep`, awaits awaitable values."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        value: T = await result if inspect.isawaitable(result) else result
        if done(value) if done is not None else value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(_timed_out(probe, what, timeout, value))
        await asyncio.sleep(interval)


def _timed_out(probe: Callable[..., Any], what: str | None, timeout: float, last: object) -> str:
    message = f"timed out after {timeout:g}s waiting for {what or _describe(probe)}"
    return message if isinstance(last, bool) else f"{message}; last: {last!r}"


def _describe(probe: Callable[..., Any]) -> str:
    """A lambda by its source (from `lambda` to the end of its lines), anything else by name."""
    name = getattr(probe, "__qualname__", repr(probe))
    if getattr(probe, "__name__", None) != "<lambda>":
        return name
    try:
        source = " ".join(line.strip() for line in inspect.getsource(probe).splitlines())
    except (OSError, TypeError):
        return name
    return source[source.find("lambda") :]
