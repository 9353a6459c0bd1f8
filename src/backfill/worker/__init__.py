"""Workers: lease shards and feed their requests through the per-model dispatchers."""
