"""Helper processes that announce `READY <port>` on stdout: the test upstream and the GPU
simulator. One place for starting them with a deadline (never a fixed sleep), for their
addresses and for stopping them.

A separate process, not a thread, so a helper's event loop and GIL never compete with the code
under test (throughput figures stay honest) and `kill` semantics are real. Standard library
only.
"""

from __future__ import annotations

import queue
import subprocess
import threading
import time
import urllib.request
from types import TracebackType
from typing import IO, Self


class ChildProcess:
    """A running helper process. Use as a context manager, or call `stop()`."""

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
        """The OpenAI base URL (what a model's `url` should be): `http://HOST:PORT/v1`."""
        return f"{self.base}/v1"

    def request(self, method: str, path: str, timeout: float = 5.0) -> bytes:
        req = urllib.request.Request(
            self.base + path, method=method, data=b"" if method == "POST" else None
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data: bytes = resp.read()
        return data

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)

    def __enter__(self) -> Self:
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


def spawn_ready(
    cmd: list[str], *, what: str, startup_timeout: float
) -> tuple[subprocess.Popen[str], int]:
    """Start `cmd` and wait (with a deadline) for its `READY <port>` line."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, bufsize=1)
    assert proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    deadline = time.monotonic() + startup_timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{what} did not print READY within {startup_timeout:g}s")
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"{what} exited before READY (exit code {proc.wait()})")
            if line.startswith("READY "):
                return proc, int(line.split()[1])
    except BaseException:
        proc.kill()
        proc.wait()
        raise
