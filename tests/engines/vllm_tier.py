"""What the real-engine tier's modules share (a module of its own: `conftest` is not importable
by name from every tier)."""

from __future__ import annotations

from pathlib import Path

from backfill.testing.server import BackfillProcess
from backfill.testing.vllm import VllmProcess

KEY = "sk-engines"
MODEL = "tiny"
MAX_NUM_SEQS = 4
MAX_MODEL_LEN = 4096
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
SERVER_ENV = {
    **OFFLINE_ENV,
    "BACKFILL_SHARD_SIZE": "50",
    "BACKFILL_FLUSH_EVERY_SECONDS": "0.1",
    "BACKFILL_SCHEDULER_INTERVAL": "0.1",
}


def backfill_for(
    data_dir: Path, vllm: VllmProcess, *, model_options: str = "", env: dict[str, str] | None = None
) -> BackfillProcess:
    """A `backfill serve` whose model `tiny` is the vLLM server, with extra TOML model options."""
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "backfill.toml"
    config.write_text(f'[models.{MODEL}]\nurl = "{vllm.url}"\n{model_options}\n')
    return BackfillProcess(
        data_dir,
        api_keys=[KEY],
        extra_args=["--config", str(config)],
        env={**SERVER_ENV, **(env or {})},
    )
