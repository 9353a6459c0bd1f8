"""Test helpers that are real parts, not mocks: a fast scriptable OpenAI-compatible upstream.

Shipped inside the package so benchmarks, the acceptance suite and users reproducing a bug can
all run `python -m backfill.testing.upstream`. Importing this package starts nothing.
"""

from backfill.testing.process import UpstreamProcess, start_upstream

__all__ = ["UpstreamProcess", "start_upstream"]
