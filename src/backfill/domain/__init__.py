"""Pure logic of backfill, no I/O: the standard library plus orjson (the hot JSONL paths)."""
