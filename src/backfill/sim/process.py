"""Run the simulator as a subprocess: `with start_sim(speedup=10) as sim: ... sim.url ...`.

A separate process (not a thread) so the simulator's step loop never competes for the GIL with
the code under test, exactly like `backfill.testing.process.start_upstream`. Standard library
only, besides `backfill.metrics.parse`. Startup waits for the child's `READY <port>` line
with a deadline.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from backfill.metrics import parse
from backfill.testing.child import ChildProcess, spawn_ready

__all__ = ["SimProcess", "start_sim"]


class SimProcess(ChildProcess):
    """A running simulator child process. Use as a context manager, or call `stop()`."""

    def __init__(
        self, proc: subprocess.Popen[str], host: str, port: int, model_name: str | None
    ) -> None:
        super().__init__(proc, host, port)
        self._model_name = model_name

    def _get(self, path: str, timeout: float) -> bytes:
        return self.request("GET", path, timeout)

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


def start_sim(
    profile: str = "llama-3.1-8b-h100",
    *,
    speedup: float = 10.0,
    host: str = "127.0.0.1",
    port: int = 0,
    model_name: str | None = None,
    max_num_seqs: int | None = None,
    max_num_batched_tokens: int | None = None,
    long_prefill_token_threshold: int | None = None,
    num_gpu_blocks: int | None = None,
    stream_interval_ms: float | None = None,
    uvloop: bool = True,
    metrics: bool = True,
    startup_timeout: float = 15.0,
) -> SimProcess:
    """Start `python -m backfill.sim` and wait (with a deadline) until it listens."""
    cmd = [sys.executable, "-m", "backfill.sim", "--profile", profile, "--host", host]
    cmd += ["--port", str(port), "--speedup", repr(float(speedup))]
    optional = {
        "--model-name": model_name,
        "--max-num-seqs": max_num_seqs,
        "--max-num-batched-tokens": max_num_batched_tokens,
        "--long-prefill-token-threshold": long_prefill_token_threshold,
        "--num-gpu-blocks": num_gpu_blocks,
        "--stream-interval-ms": stream_interval_ms,
    }
    for flag, value in optional.items():
        if value is not None:
            cmd += [flag, str(value)]
    if not uvloop:
        cmd.append("--no-uvloop")
    if not metrics:
        cmd.append("--no-metrics")
    proc, bound = spawn_ready(cmd, what="sim", startup_timeout=startup_timeout)
    return SimProcess(proc, host, bound, model_name)
