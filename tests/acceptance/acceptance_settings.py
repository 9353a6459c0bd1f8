"""Settings shared by the acceptance tests' servers (importable by tests; conftest is not)."""

#: small shards, quick ticks and flushes, short leases: a batch is done in well under a second
FAST_ENV = {
    "BACKFILL_SHARD_SIZE": "2",
    "BACKFILL_FLUSH_EVERY_SECONDS": "0.1",
    "BACKFILL_SCHEDULER_INTERVAL": "0.1",
    "BACKFILL_LEASE_SECONDS": "2",
    "BACKFILL_CANCEL_GRACE_SECONDS": "0.2",
}
