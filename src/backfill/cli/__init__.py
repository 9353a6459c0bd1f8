"""Command line: `backfill serve | worker | keys create`. Thin: parse, call, print."""
