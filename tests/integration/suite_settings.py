"""Settings of the shared integration server, importable by tests (conftest is not)."""

from __future__ import annotations

import sys

KEY_A = "sk-integration-project-a"
MODELS = ("m", "m2")
MAX_UPLOAD_BYTES = 1024 * 1024
MAX_REQUESTS = 25
MAX_TOKENS = 100_000
CLI = [sys.executable, "-m", "backfill.cli.main"]
SERVER_ENV = {
    "BACKFILL_SHARD_SIZE": "3",
    "BACKFILL_FLUSH_EVERY_SECONDS": "0.1",
    "BACKFILL_SCHEDULER_INTERVAL": "0.1",
    "BACKFILL_LEASE_SECONDS": "3",
    "BACKFILL_CANCEL_GRACE_SECONDS": "0.3",
    "BACKFILL_MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
    "BACKFILL_MAX_REQUESTS_PER_BATCH": str(MAX_REQUESTS),
    "BACKFILL_MAX_ENQUEUED_TOKENS": str(MAX_TOKENS),
}
