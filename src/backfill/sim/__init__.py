"""`backfill sim`: a simulated vLLM deployment (one GPU or one TP group) for GPU-free benches.

Modules, from the inside out:

- `profiles`: `Profile` (model dims, GPU figures, efficiencies, vLLM limits), `PROFILES`,
  `get_profile(name, **overrides)`.
- `roofline`: `StepCost`, the step-time formula (documented there, with every coefficient).
- `tokens`: the whitespace "tokenizer", prefix-block hashes, dummy output text.
- `kvcache`: the paged KV cache with prefix caching and LRU eviction.
- `engine`: `Engine` and `SimRequest`, vLLM v1's scheduler (chunked prefill, priority,
  preemption by recompute) on a simulated clock. Pure: no I/O, no sleeping.
- `metrics`: vLLM-named counters/histograms and their Prometheus `render` (through
  `backfill.metrics`, which also gives `parse_metrics`).
- `offline`: `Simulator(profile).run_offline(requests) -> OfflineStats`, `sharegpt_like`.
- HTTP/1.1 plumbing: `backfill.testing.httpserver`, shared with the echo upstream.
- `exchange`: `Exchange`, one request's answer (JSON or SSE chunks, with the `sim` latencies).
- `server`: the OpenAI-compatible API (`SimServer`) pacing the engine against wall time at
  `speedup` x.
- `process`: `start_sim(...) -> SimProcess`, the server as a subprocess for benches and tests.

`python -m backfill.sim --profile llama-3.1-8b-h100 --port 8001 --speedup 10` (or
`backfill sim ...`) prints `READY <port>` once it listens.
"""

from backfill.metrics import parse as parse_metrics
from backfill.sim.engine import Engine, SimRequest, StepResult
from backfill.sim.offline import (
    Distribution,
    OfflineRequest,
    OfflineStats,
    Simulator,
    sharegpt_like,
)
from backfill.sim.process import SimProcess, start_sim
from backfill.sim.profiles import PROFILES, Profile, get_profile
from backfill.sim.tokens import Prompt, chat_prompt, completion_prompt

__all__ = [
    "PROFILES",
    "Distribution",
    "Engine",
    "OfflineRequest",
    "OfflineStats",
    "Profile",
    "Prompt",
    "SimProcess",
    "SimRequest",
    "Simulator",
    "StepResult",
    "chat_prompt",
    "completion_prompt",
    "get_profile",
    "parse_metrics",
    "sharegpt_like",
    "start_sim",
]
