"""The request files in `examples/` (used by the README) are valid batch inputs for the default
models: every line passes backfill's own validation, ids are unique, one endpoint per file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backfill.domain.validation import InputValidator, ValidationLimits
from backfill.engines.embeddings import PACKAGED_NAME
from backfill.engines.smollm2 import NAME as CHAT_MODEL

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SERVED = {
    CHAT_MODEL: frozenset({"/v1/chat/completions", "/v1/completions"}),
    PACKAGED_NAME: frozenset({"/v1/embeddings"}),
}
FILES = sorted(EXAMPLES.glob("*.jsonl"))


def test_the_three_workloads_have_examples() -> None:
    assert [f.name for f in FILES] == [
        "classify_tickets.jsonl",
        "embed_products.jsonl",
        "prompt_sweep.jsonl",
    ]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_example_is_a_valid_batch_file(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    endpoints = {row["url"] for row in rows}
    assert len(endpoints) == 1
    validator = InputValidator(
        batch_id="batch_example",
        endpoint=endpoints.pop(),
        served=SERVED,
        limits=ValidationLimits(max_embedding_inputs=50_000),
    )
    validator.feed(path.read_bytes())
    result = validator.finish()
    assert result.ok, result.errors
    assert result.total == len(rows) == len({row["custom_id"] for row in rows})
