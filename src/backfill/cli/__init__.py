"""Command line: `backfill serve | worker | run | keys create|list|revoke | sim`. Thin: parse,
call, print."""
