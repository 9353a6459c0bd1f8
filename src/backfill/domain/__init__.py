"""Pure logic of backfill: standard library only, no I/O."""
