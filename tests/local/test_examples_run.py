"""`backfill run` on an example file with no model configured: the default chat model
(SmolLM2-135M-Instruct, fetched and converted into the cache on first use) answers every line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def test_run_classifies_the_example_tickets_with_the_default_chat_model(
    tmp_path: Path, minilm_dir: Path
) -> None:
    src = EXAMPLES / "classify_tickets.jsonl"
    out = tmp_path / "labels.jsonl"
    command = [sys.executable, "-m", "backfill.cli.main", "run", str(src), "-o", str(out)]
    done = subprocess.run(
        [*command, "--no-progress"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    inputs = [json.loads(line)["custom_id"] for line in src.read_text().splitlines()]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["custom_id"] for r in rows) == sorted(inputs)  # each line exactly once
    for row in rows:
        assert row["error"] is None, row
        body = row["response"]["body"]
        assert body["model"] == "SmolLM2-135M-Instruct"
        assert body["choices"][0]["message"]["content"].strip()
        assert 0 < body["usage"]["completion_tokens"] <= 4
