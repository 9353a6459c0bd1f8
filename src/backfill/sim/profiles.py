"""Hardware + model profiles: what one simulated vLLM deployment is made of.

A `Profile` is a frozen value: model dimensions, data types, the GPU(s) it runs on, the efficiency
coefficients that turn peak hardware figures into realistic step times, and vLLM's scheduler
limits. Everything the simulator derives (weight bytes, KV bytes per token, number of KV blocks,
the per-step cost coefficients in `roofline.py`) is computed from these fields, so a variant is
just `dataclasses.replace(profile, max_num_seqs=64)` (or `get_profile(name, **overrides)`).

Sources of the fixed figures:

- Llama-3.1 dimensions: the model cards / `config.json` (8B: 8.03e9 params, 32 layers, hidden
  4096, 32 query heads, 8 KV heads, head dim 128; 70B: 70.55e9 params, 80 layers, hidden 8192,
  64 query heads, 8 KV heads, head dim 128), max context 131072 tokens.
- H100 SXM 80GB: 989.4 TFLOPS dense BF16 (1979 dense FP8), 3.35 TB/s HBM3, 81559 MiB reported by
  `nvidia-smi`, NVLink 4 at 450 GB/s per direction (NVIDIA datasheet).
- vLLM defaults: `block_size=16`, `gpu_memory_utilization=0.9`; for the OpenAI server on
  >= 70 GB GPUs vLLM v1 uses `max_num_seqs=1024` and `max_num_batched_tokens=8192` (the
  chunked-prefill token budget). The dataclass defaults (256 / 8192) are vLLM's values for
  smaller GPUs.
- `activation_reserve_bytes`: memory vLLM's profiling run keeps out of the KV cache per GPU
  (activation peak for one `max_num_batched_tokens` step, CUDA graphs, NCCL and allocator slack).
  About 2 GiB per GPU in vLLM's start-up logs for these models; an assumption, not a measurement.

The efficiency coefficients (`mfu`, `mbu`, `step_overhead_s`, `seq_overhead_s`) are calibrated
by `bench/sim_calibration.py` against published offline throughput; see `roofline.py` for the
formulas and the profile definitions below for the chosen values and their reasoning.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["PROFILES", "Profile", "get_profile"]

GIB = 1024**3
H100_MEMORY = 81559 * 1024**2  # bytes, as nvidia-smi reports for an H100 SXM 80GB
H100_BF16_FLOPS = 989.4e12  # dense
H100_FP8_FLOPS = 1978.9e12  # dense
H100_HBM_BW = 3.35e12  # bytes/s
NVLINK4_BW = 450e9  # bytes/s, per direction per GPU


@dataclass(frozen=True, slots=True)
class Profile:
    """One model on one deployment (one GPU, or one tensor-parallel group)."""

    name: str
    model: str  # the served model name by default
    # model dimensions
    params: float
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    weight_bytes_per_param: float
    kv_bytes_per_value: float
    max_model_len: int
    # hardware (per GPU) and parallelism
    tp: int
    gpu_memory_bytes: float
    peak_flops: float  # per GPU, dense, at the weights' compute dtype
    hbm_bandwidth: float  # per GPU, bytes/s
    interconnect_bandwidth: float  # per GPU, bytes/s (NVLink), used when tp > 1
    allreduce_latency_s: float  # fixed cost of one all-reduce, used when tp > 1
    # efficiencies and overheads (calibrated)
    mfu: float  # fraction of peak FLOPS the step's matmuls + attention reach
    mbu: float  # fraction of HBM bandwidth the step's weight + KV reads reach
    step_overhead_s: float  # per engine step: scheduling, sampling, launch gaps
    seq_overhead_s: float  # per scheduled sequence per step: input prep, sampling, detokenize
    # vLLM engine configuration
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    long_prefill_token_threshold: int = 0  # prefill tokens per request per step (0: no cap)
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    activation_reserve_bytes: float = 2 * GIB  # per GPU
    num_gpu_blocks_override: int | None = None

    # ---- derived quantities -----------------------------------------------------------------
    @property
    def weight_bytes(self) -> float:
        """Bytes of weights across the whole TP group (each GPU holds 1/tp of them)."""
        return self.params * self.weight_bytes_per_param

    @property
    def kv_bytes_per_token(self) -> float:
        """K and V for every layer: 2 * layers * kv_heads * head_dim * bytes (whole TP group)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.kv_bytes_per_value

    @property
    def kv_cache_bytes(self) -> float:
        budget = self.gpu_memory_bytes * self.gpu_memory_utilization * self.tp
        return budget - self.weight_bytes - self.activation_reserve_bytes * self.tp

    @property
    def num_gpu_blocks(self) -> int:
        """KV blocks of `block_size` tokens that fit (vLLM's `num_gpu_blocks`)."""
        if self.num_gpu_blocks_override is not None:
            return self.num_gpu_blocks_override
        blocks = int(self.kv_cache_bytes // (self.kv_bytes_per_token * self.block_size))
        if blocks <= 0:
            raise ValueError(f"profile {self.name}: the weights do not leave room for a KV cache")
        return blocks

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_gpu_blocks * self.block_size

    def describe(self) -> dict[str, Any]:
        """The profile's fields plus its derived sizes, for logs and `/sim/stats`."""
        out = dataclasses.asdict(self)
        out.update(
            weight_bytes=self.weight_bytes,
            kv_bytes_per_token=self.kv_bytes_per_token,
            num_gpu_blocks=self.num_gpu_blocks,
            kv_capacity_tokens=self.kv_capacity_tokens,
        )
        return out


def _llama(size: str, **fields: Any) -> dict[str, Any]:
    dims: dict[str, Any] = (
        dict(params=8.03e9, layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128)
        if size == "8b"
        else dict(params=70.55e9, layers=80, hidden=8192, heads=64, kv_heads=8, head_dim=128)
    )
    return dims | fields


_H100: dict[str, Any] = dict(
    gpu_memory_bytes=H100_MEMORY,
    hbm_bandwidth=H100_HBM_BW,
    interconnect_bandwidth=NVLINK4_BW,
    allreduce_latency_s=8e-6,  # NCCL/custom all-reduce of a small message over NVLink
    max_model_len=131072,
    # vLLM v1's defaults for the OpenAI server on >= 70 GB GPUs (H100 class)
    max_num_seqs=1024,
    max_num_batched_tokens=8192,
)

# Calibration (bench/sim_calibration.py prints the comparison; a ShareGPT-like mix of 5000
# requests, 229 prompt / 190 output tokens on average, all arriving at once):
# - 8B bf16 on one H100: published offline throughput for vLLM and SGLang is 22-24k total
#   tokens/s. Single-stream decode on vLLM runs at ~125 tokens/s (8 ms per step): weights at
#   mbu 0.75 (6.4 ms) + 1.5 ms of step overhead (scheduler, sampler, launch gaps). Mixed
#   prefill+decode steps of ~1000 tokens are compute bound; mfu 0.45 (GEMMs of 1k x 4k at
#   60-70% of peak, diluted by attention, norms and activations) lands the throughput in the
#   band (~23.1k tokens/s).
# - 70B bf16, TP=4 on H100: 19.04 requests/s offline on ShareGPT for vLLM 0.6.0 (SGLang's
#   benchmark/benchmark_vllm_060 README; 3700 output tokens/s), and a median TPOT of 23.6 ms
#   (vLLM) / 25.0 ms (SGLang) at 4 requests/s. mbu 0.6 and 3 ms of step overhead (TP
#   synchronisation) give that TPOT; mfu 0.34 (each GPU's GEMMs are a quarter of the size and
#   all-reduce traffic is only partly hidden) gives ~19 requests/s.
# - 8B FP8 (W8A8) on one H100: no reference run was at hand; an estimate: half the weight
#   bytes, the FP8 peak at a lower mfu (0.3 of 1979 TFLOPS = 1.33x the bf16 effective rate,
#   the speed-up usually reported for FP8 at high batch), KV cache kept in bf16.
PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            name="llama-3.1-8b-h100",
            model="meta-llama/Llama-3.1-8B-Instruct",
            weight_bytes_per_param=2,
            kv_bytes_per_value=2,
            tp=1,
            peak_flops=H100_BF16_FLOPS,
            mfu=0.45,
            mbu=0.75,
            step_overhead_s=1.5e-3,
            seq_overhead_s=6e-6,
            **_llama("8b", **_H100),
        ),
        Profile(
            name="llama-3.1-8b-fp8-h100",
            model="meta-llama/Llama-3.1-8B-Instruct-FP8",
            weight_bytes_per_param=1,
            kv_bytes_per_value=2,
            tp=1,
            peak_flops=H100_FP8_FLOPS,
            mfu=0.3,
            mbu=0.75,
            step_overhead_s=1.5e-3,
            seq_overhead_s=6e-6,
            **_llama("8b", **_H100),
        ),
        Profile(
            name="llama-3.1-70b-4xh100",
            model="meta-llama/Llama-3.1-70B-Instruct",
            weight_bytes_per_param=2,
            kv_bytes_per_value=2,
            tp=4,
            peak_flops=H100_BF16_FLOPS,
            mfu=0.34,
            mbu=0.6,
            step_overhead_s=3e-3,
            seq_overhead_s=6e-6,
            **_llama("70b", **_H100),
        ),
    )
}


def get_profile(name: str, **overrides: Any) -> Profile:
    """A named profile, optionally with fields replaced (`max_num_seqs=64`, `mfu=0.4`, ...)."""
    try:
        profile = PROFILES[name]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise ValueError(f"unknown sim profile {name!r} (known: {known})") from None
    return dataclasses.replace(profile, **overrides) if overrides else profile
