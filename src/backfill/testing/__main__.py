"""`python -m backfill.testing`: the test upstream, same flags as `backfill.testing.upstream`."""

from backfill.testing.upstream import main

main()
