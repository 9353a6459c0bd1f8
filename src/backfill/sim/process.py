"""Run the simulator as a subprocess: `with start_sim(speedup=10) as sim: ... sim.url ...`.

A separate process (not a thread) so the simulator's step loop never competes for the GIL with
the code under test, exactly like `backfill.testing.process.start_upstream`. Standard library
only. Startup waits for the child's `READY <port>` line with a deadline.
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

from backfill.sim.metrics import parse

__all__ = ["SimProcess", "start_sim"]


class SimProcess:
    """A running simulator child process. Use as a context manager, or call `stop()`."""

    def __init__(
        self, proc: subprocess.Popen[str], host: str, port: int, model_name: str | None
    ) -> None:
        self.proc = proc
        self.host = host
        self.port = port
        self._model_name = model_name

    @property
    def base(self) -> str:
        """`http://HOST:PORT`, without `/v1`."""
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The OpenAI base URL: `http://HOST:PORT/v1`."""
        return f"{self.base}/v1"

    def _get(self, path: str, timeout: float) -> bytes:
        with urllib.request.urlopen(self.base + path, timeout=timeout) as resp:
            data: bytes = resp.read()
        return data

    def metrics_text(self, timeout: float = 5.0) -> str:
        return self._get("/metrics", timeout).decode()

    def metrics(self, timeout: float = 5.0) -> dict[str, float]:
        """`/metrics` parsed: `{"vllm:num_requests_running": 3.0, ...}` (see `metrics.parse`)."""
        return parse(self.metrics_text(timeout))

    def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        """`/sim/stats`: simulated clock, load, counters."""
        result: dict[str, Any] = json.loads(self._get("/sim/stats", timeout))
        return result

    @property
    def model_name(self) -> str:
        """The served model name (asked once from `/v1/models` unless given at start)."""
        if self._model_name is None:
            self._model_name = str(json.loads(self._get("/v1/models", 5.0))["data"][0]["id"])
        return self._model_name

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)

    def __enter__(self) -> SimProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _read_lines(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    with stream:
        for line in stream:
            lines.put(line)
    lines.put(None)


def start_sim(
    profile: str = "llama-3.1-8b-h100",
    *,
    speedup: float = 10.0,
    host: str = "127.0.0.1",
    port: int = 0,
    model_name: str | None = None,
    max_num_seqs: int | None = None,
    max_num_batched_tokens: int | None = None,
    num_gpu_blocks: int | None = None,
    stream_interval_ms: float | None = None,
    uvloop: bool = True,
    startup_timeout: float = 15.0,
) -> SimProcess:
    """Start `python -m backfill.sim` and wait (with a deadline) until it listens."""
    cmd = [sys.executable, "-m", "backfill.sim", "--profile", profile, "--host", host]
    cmd += ["--port", str(port), "--speedup", repr(float(speedup))]
    optional = {
        "--model-name": model_name,
        "--max-num-seqs": max_num_seqs,
        "--max-num-batched-tokens": max_num_batched_tokens,
        "--num-gpu-blocks": num_gpu_blocks,
        "--stream-interval-ms": stream_interval_ms,
    }
    for flag, value in optional.items():
        if value is not None:
            cmd += [flag, str(value)]
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
                raise TimeoutError(f"sim did not print READY within {startup_timeout:g}s")
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"sim exited before READY (exit code {proc.wait()})")
            if line.startswith("READY "):
                return SimProcess(proc, host, int(line.split()[1]), model_name)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
