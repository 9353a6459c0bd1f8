"""Run the test upstream as a subprocess: `with start_upstream() as up: ... up.url ...`.

A separate process, not a thread, so the upstream's event loop and GIL never compete with the
code under test (throughput figures stay honest) and `kill` semantics are real. Standard library
only: the helper must not pull the HTTP client we are testing into the picture.

Startup waits for the child's `READY <port>` line with a deadline, never a fixed sleep; a child
that dies or stays silent fails loudly with its exit code.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from backfill.testing.child import ChildProcess, spawn_ready


class UpstreamProcess(ChildProcess):
    """A running upstream child process. Use as a context manager, or call `stop()`."""

    def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        """`{"requests": int, "by_text": {text: count}}` since start or the last `reset()`."""
        result: dict[str, Any] = json.loads(self.request("GET", "/stats", timeout))
        return result

    def reset(self, timeout: float = 5.0) -> None:
        self.request("POST", "/reset", timeout)


def start_upstream(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    api_key: str | None = None,
    latency_ms: float = 0.0,
    uvloop: bool = True,
    startup_timeout: float = 15.0,
) -> UpstreamProcess:
    """Start `python -m backfill.testing.upstream` and wait (with a deadline) until it listens."""
    cmd = [sys.executable, "-m", "backfill.testing.upstream", "--host", host, "--port", str(port)]
    if api_key is not None:
        cmd += ["--api-key", api_key]
    if latency_ms:
        cmd += ["--latency-ms", str(latency_ms)]
    if not uvloop:
        cmd.append("--no-uvloop")
    proc, bound = spawn_ready(cmd, what="upstream", startup_timeout=startup_timeout)
    return UpstreamProcess(proc, host, bound)
