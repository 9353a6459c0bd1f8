"""Run `backfill serve` (or `backfill worker`) as a real subprocess for tests and benchmarks.

The port is picked by binding port 0 first; startup polls `/health` with a deadline instead of
sleeping. Output goes to a log file in the data dir so a failing test can show it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class BackfillProcess:
    def __init__(
        self,
        data_dir: Path,
        *,
        api_keys: list[str] | None = None,
        models: list[str] | None = None,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        port: int | None = None,
        command: str = "serve",
    ) -> None:
        self.data_dir = data_dir
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.api_keys = api_keys or []
        self.models = models or []
        self.extra_args = extra_args or []
        self.env = env or {}
        self.command = command
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / f"{command}-{self.port}.log"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def args(self) -> list[str]:
        cmd = [sys.executable, "-m", "backfill.cli.main", self.command]
        cmd += ["--data-dir", str(self.data_dir)]
        if self.command == "serve":
            cmd += ["--host", self.host, "--port", str(self.port)]
            for key in self.api_keys:
                cmd += ["--api-key", key]
        for spec in self.models:
            cmd += ["--model", spec]
        return cmd + self.extra_args

    def start(self, timeout: float = 30.0) -> BackfillProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.args(), stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        if self.command == "serve":
            self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://{self.host}:{self.port}/health"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"backfill exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"backfill did not become healthy in {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    def kill(self) -> None:
        """kill -9: no cleanup, like a crashed machine."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> BackfillProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
