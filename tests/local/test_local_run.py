"""`backfill run`: the real CLI in a subprocess, offline, with resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

CLI = [sys.executable, "-m", "backfill.cli.main", "run"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def write_input(path: Path, n: int) -> None:
    with path.open("w") as fh:
        for i in range(n):
            tokens = 500 if i == 3 else 6  # line 4 cannot fit the 128-token context
            body = {
                "model": "tiny",
                "messages": [{"role": "user", "content": f"hello world {i}"}],
                "max_tokens": tokens,
                "seed": i,
            }
            row = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions"}
            fh.write(json.dumps({**row, "body": body}) + "\n")


def ids(*paths: Path) -> Counter[str]:
    found: Counter[str] = Counter()
    for p in paths:
        if p.exists():
            for raw in p.read_text().splitlines():
                if raw.strip():
                    found[json.loads(raw)["custom_id"]] += 1
    return found


def cli(*args: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=300
    )


def test_run_then_resume_from_partial_output(tmp_path: Path, tiny_model_dir: Path) -> None:
    src, out, err = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    write_input(src, 30)
    model = f"tiny=transformers:{tiny_model_dir}"

    first = cli(src, "-o", out, "--errors", err, "--model", model)
    assert first.returncode == 0, first.stderr
    assert ids(out, err) == Counter({f"r{i}": 1 for i in range(30)})
    assert set(ids(err)) == {"r3"}
    bad = json.loads(err.read_text())
    assert bad["response"]["body"]["error"]["code"] == "context_length_exceeded"
    assert "30/30" in first.stderr  # the progress bar

    # as if killed: keep 10 finished lines and a torn 11th, lose the error file
    kept = out.read_text().splitlines()[:11]
    resumed_out = tmp_path / "resumed.jsonl"
    resumed_out.write_text("\n".join(kept[:10]) + "\n" + kept[10][:25])
    resumed_err = tmp_path / "resumed.errors.jsonl"  # the default name beside the output
    second = cli(src, "-o", resumed_out, "--model", model, "--no-progress")
    assert second.returncode == 0, second.stderr
    assert "10 already done" in second.stderr
    assert ids(resumed_out, resumed_err) == Counter({f"r{i}": 1 for i in range(30)})

    # a third run has nothing left to do
    third = cli(src, "-o", resumed_out, "--model", model, "--no-progress")
    assert third.returncode == 0 and "0 completed, 0 failed, 30 already done" in third.stderr


def test_run_rejects_a_bad_file(tmp_path: Path, tiny_model_dir: Path) -> None:
    src = tmp_path / "in.jsonl"
    row = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions"}
    src.write_text(json.dumps({**row, "body": {"model": "nope"}}) + "\nnot json\n")
    done = cli(src, "-o", tmp_path / "out.jsonl", "--model", f"tiny=transformers:{tiny_model_dir}")
    assert done.returncode == 2
    assert "line 1: model_not_found" in done.stderr and "line 2: invalid_json_line" in done.stderr


def test_run_embeddings_with_the_default_model(tmp_path: Path, minilm_dir: Path) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    with src.open("w") as fh:
        for i in range(20):
            body = {"model": "all-MiniLM-L6-v2", "input": f"row {i} of the table"}
            fh.write(
                json.dumps(
                    {"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings", "body": body}
                )
                + "\n"
            )
    done = cli(src, "-o", out, "--no-progress")  # no --model: the packaged MiniLM
    assert done.returncode == 0, done.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 20
    assert all(len(r["response"]["body"]["data"][0]["embedding"]) == 384 for r in rows)
