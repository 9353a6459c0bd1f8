"""The client CLI (`backfill submit | batches | files | retry`) against a real `backfill serve`.

Run as subprocesses with `OPENAI_BASE_URL` / `OPENAI_API_KEY`, as a user would. One server for
the module (the commands never change its configuration); each test uploads its own lines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sdk_helpers import chat_line, jsonl

from backfill.testing import UpstreamProcess
from backfill.testing.server import BackfillProcess

CLI = [sys.executable, "-m", "backfill.cli.main"]
KEY = "sk-client-cli-test-key"


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamProcess
) -> Iterator[BackfillProcess]:
    proc = BackfillProcess(
        tmp_path_factory.mktemp("client-cli"), api_keys=[KEY], models=[f"m={upstream.url}"]
    ).start()
    try:
        yield proc
    except BaseException:
        print(proc.logs())
        raise
    finally:
        proc.stop()


def cli(
    server: BackfillProcess, cwd: Path, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": KEY}
    out = subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=120, env=env, cwd=cwd
    )
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def unique(text: str) -> str:
    """Scripted upstream failures remember texts: keep every text unique."""
    return f"{text} {uuid.uuid4().hex}"


def write_input(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_bytes(jsonl(lines))
    return path


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_submit_wait_downloads_every_result(server: BackfillProcess, tmp_path: Path) -> None:
    ids = [f"q{i}" for i in range(12)]
    path = write_input(tmp_path / "in.jsonl", [chat_line(i, unique(f"hello {i}")) for i in ids])
    out = cli(server, tmp_path, "submit", str(path), "--wait", "--interval", "0.2")
    batch_id = out.stdout.strip()
    assert batch_id.startswith("batch_"), out.stdout
    rows = read_lines(tmp_path / f"{batch_id}.output.jsonl")
    assert sorted(row["custom_id"] for row in rows) == sorted(ids)  # each exactly once
    assert all(row["response"]["status_code"] == 200 for row in rows)
    assert not (tmp_path / f"{batch_id}.errors.jsonl").exists()

    # `files download` of the same output file, by id
    got = json.loads(cli(server, tmp_path, "batches", "get", batch_id, "--json").stdout)
    assert got["status"] == "completed" and got["request_counts"]["completed"] == 12
    dest = tmp_path / "copy.jsonl"
    cli(server, tmp_path, "files", "download", got["output_file_id"], "-o", str(dest))
    assert dest.read_bytes() == (tmp_path / f"{batch_id}.output.jsonl").read_bytes()


def test_submit_json_metadata_and_batches_list(server: BackfillProcess, tmp_path: Path) -> None:
    path = write_input(tmp_path / "in.jsonl", [chat_line("only", unique("hi"))])
    out = cli(server, tmp_path, "submit", str(path), "--json", "--metadata", "team=a")
    batch = json.loads(out.stdout)
    assert batch["id"].startswith("batch_")
    assert batch["endpoint"] == "/v1/chat/completions"  # from the first line's url
    assert batch["completion_window"] == "24h"
    assert batch["metadata"] == {"team": "a"}

    listed = json.loads(cli(server, tmp_path, "batches", "list", "--json").stdout)
    assert isinstance(listed, list)
    assert batch["id"] in [b["id"] for b in listed]
    table = cli(server, tmp_path, "batches", "list").stdout
    assert batch["id"] in table and "STATUS" in table

    files = json.loads(cli(server, tmp_path, "files", "list", "--json").stdout)
    assert batch["input_file_id"] in [f["id"] for f in files]
    cli(server, tmp_path, "batches", "watch", batch["id"], "--interval", "0.2")


def test_retry_makes_a_batch_of_the_failed_lines(server: BackfillProcess, tmp_path: Path) -> None:
    lines = [chat_line(f"ok{i}", unique(f"fine {i}")) for i in range(4)]
    lines += [chat_line(f"bad{i}", unique(f"too long {i} #fail400")) for i in range(3)]
    path = write_input(tmp_path / "in.jsonl", lines)
    first = cli(server, tmp_path, "submit", str(path), "--wait", "--interval", "0.2", "--json")
    batch = json.loads(first.stdout)  # completed: failed requests do not fail a batch
    assert batch["request_counts"] == {"total": 7, "completed": 4, "failed": 3}
    errors = read_lines(tmp_path / f"{batch['id']}.errors.jsonl")
    assert sorted(row["custom_id"] for row in errors) == ["bad0", "bad1", "bad2"]

    second = cli(server, tmp_path, "retry", batch["id"], "--wait", "--interval", "0.2", "--json")
    retried = json.loads(second.stdout)  # the lines fail again: still a completed batch
    assert retried["id"] != batch["id"]
    assert retried["metadata"] == {"retry_of": batch["id"]}
    assert retried["request_counts"]["total"] == 3
    retried_input = tmp_path / "retried.jsonl"
    cli(server, tmp_path, "files", "download", retried["input_file_id"], "-o", str(retried_input))
    assert read_lines(retried_input) == lines[4:]  # the very lines, in input order

    # a retry of the retry still points at the first batch
    third = cli(server, tmp_path, "retry", retried["id"], "--json")
    assert json.loads(third.stdout)["metadata"] == {"retry_of": batch["id"]}


def test_errors_and_version(server: BackfillProcess, tmp_path: Path) -> None:
    out = cli(server, tmp_path, "--version")
    assert out.stdout.strip() == "backfill 0.1.0"
    missing = cli(server, tmp_path, "batches", "get", "batch_nope", check=False)
    assert missing.returncode == 1
    assert missing.stderr.startswith("backfill: HTTP 404")
    bad_key = cli(server, tmp_path, "files", "list", "--api-key", "sk-wrong", check=False)
    assert bad_key.returncode == 1 and "HTTP 401" in bad_key.stderr


def test_submit_wait_against_the_simulator(tmp_path: Path) -> None:
    """The same `submit --wait` with `backfill sim` (a simulated vLLM: streaming, metrics, the
    governor reading them) as the model's upstream."""
    from backfill.sim.process import start_sim

    with start_sim(speedup=50.0, model_name="sim-llama") as sim:
        proc = BackfillProcess(
            tmp_path / "data", api_keys=[KEY], models=[f"sim-llama={sim.url}"]
        ).start()
        try:
            lines = [chat_line(f"s{i}", f"question {i}", model="sim-llama") for i in range(20)]
            path = write_input(tmp_path / "sim.jsonl", lines)
            out = cli(proc, tmp_path, "submit", str(path), "--wait", "--interval", "0.2")
            batch_id = out.stdout.strip()
            rows = read_lines(tmp_path / f"{batch_id}.output.jsonl")
            assert sorted(r["custom_id"] for r in rows) == sorted(f"s{i}" for i in range(20))
            for row in rows:
                body = row["response"]["body"]
                assert body["usage"]["completion_tokens"] > 0
                assert "sim" in body  # the simulator's own answer, with its simulated latencies
        finally:
            proc.stop()
