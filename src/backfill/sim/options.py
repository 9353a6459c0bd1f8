"""Command-line options of the simulator, shared by `backfill sim` and `python -m backfill.sim`.

Kept apart from `server.py` so that building the `backfill` CLI parser imports neither httptools
nor the server.
"""

from __future__ import annotations

import argparse

from backfill.sim.profiles import PROFILES

__all__ = ["add_arguments"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The simulator's command-line options (shared by `backfill sim` and `-m backfill.sim`)."""
    parser.add_argument("--profile", default="llama-3.1-8b-h100", choices=sorted(PROFILES))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001, help="0 picks a free port")
    parser.add_argument(
        "--speedup", type=float, default=1.0, help="simulated seconds per wall second"
    )
    parser.add_argument("--model-name", default=None, help="served model name")
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument(
        "--long-prefill-token-threshold",
        type=int,
        default=None,
        help="prefill tokens per request per step (vLLM's option; 0: no cap)",
    )
    parser.add_argument("--num-gpu-blocks", type=int, default=None, help="override KV blocks")
    parser.add_argument(
        "--stream-interval-ms", type=float, default=20.0, help="flush streams this often"
    )
    parser.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    parser.add_argument(
        "--no-metrics",
        action="store_true",
        help="answer 404 to /metrics, as an engine without metrics (llama-cpp-python's server)",
    )
