"""Run the test upstream as a subprocess: `with start_upstream() as up: ... up.url ...`.

A separate process, not a thread, so the upstream's event loop and GIL never compete with the
code under test (throughput figures stay honest) and `kill` semantics are real. Standard library
only: the helper must not pull the HTTP client we are testing into the picture.

Startup waits for the child's `READY <port>` line with a deadline, never a fixed sleep; a child
that dies or stays silent fails loudly with its exit code.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
import urllib.request
from types import TracebackType
from typing import IO, Any


class UpstreamProcess:
    """A running upstream child process. Use as a context manager, or call `stop()`."""

    def __init__(self, proc: subprocess.Popen[str], host: str, port: int) -> None:
        self.proc = proc
        self.host = host
        self.port = port

    @property
    def base(self) -> str:
        """`http://HOST:PORT`, without `/v1`."""
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """What a model's `url` should be: `http://HOST:PORT/v1`."""
        return f"{self.base}/v1"

    def _call(self, method: str, path: str, timeout: float) -> dict[str, Any]:
        req = urllib.request.Request(
            self.base + path, method=method, data=b"" if method == "POST" else None
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            result: dict[str, Any] = json.loads(resp.read())
        return result

    def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        """`{"requests": int, "by_text": {text: count}}` since start or the last `reset()`."""
        return self._call("GET", "/stats", timeout)

    def reset(self, timeout: float = 5.0) -> None:
        self._call("POST", "/reset", timeout)

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)

    def __enter__(self) -> UpstreamProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _read_lines(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    with stream:  # the child's stdout, closed here at EOF so no other thread races on it
        for line in stream:
            lines.put(line)
    lines.put(None)


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
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, bufsize=1)
    assert proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    deadline = time.monotonic() + startup_timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"upstream did not print READY within {startup_timeout:g}s")
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"upstream exited before READY (exit code {proc.wait()})")
            if line.startswith("READY "):
                return UpstreamProcess(proc, host, int(line.split()[1]))
    except BaseException:
        proc.kill()
        proc.wait()
        raise
