"""How long one engine step takes on the GPU: a roofline over the step's batch.

One vLLM v1 step runs one forward pass over every scheduled token (decode tokens and prefill
chunks together), then samples. Its time is modelled as

    t_step = max(t_compute, t_memory) + t_comm + t_overhead

    t_compute  = (2 * P * T  +  4 * L * H_attn * A) / (F * tp * mfu)
    t_memory   = (W  +  K * C) / (B * tp * mbu)
    t_comm     = (tp > 1) * (2 * L * (lat_ar + T * hidden * 2 bytes * 2 (tp-1)/tp / B_link))
    t_overhead = step_overhead_s + seq_overhead_s * S

where, for the step,

- T = tokens in the step (one per decoding sequence + every prefill-chunk token),
- A = sum over sequences of q * (c + (q + 1) / 2): attention query-key pairs, with q the
  sequence's new tokens and c the tokens already in its KV cache (causal within the chunk),
- C = sum over sequences of (c + q): KV tokens read (and written) by attention,
- S = sequences in the step,

and, from the profile,

- P = parameters; 2 * P FLOPs per token for the matmuls (multiply + add),
- 4 * L * H_attn FLOPs per query-key pair: QK^T and PV, 2 FLOPs per multiply-add each, over
  H_attn = heads * head_dim query dimensions in each of L layers,
- W = weight bytes (params * bytes per param), read once per step; K = KV bytes per token
  (2 * L * kv_heads * head_dim * bytes),
- F, B = per-GPU peak dense FLOPS and HBM bandwidth; tp = tensor-parallel degree (each GPU
  does 1/tp of the FLOPs and bytes, in parallel),
- mfu, mbu = achieved fractions of peak compute and bandwidth (calibrated),
- two all-reduces of the activations per layer under tensor parallelism (Megatron-style), each
  a fixed latency plus a ring transfer over NVLink at B_link,
- step/sequence overheads: the CPU side of vLLM (scheduling, input preparation, sampling,
  detokenization, launch gaps) which does not overlap with the GPU in this model.

The compute and memory terms overlap (max, not sum): a decode-heavy step is bandwidth bound
(weights + KV reads dominate, so the time grows with batch size and context length), a
prefill-heavy step is compute bound (grows with prefill tokens). All terms are linear in the
step aggregates, so `StepCost` precomputes one coefficient per aggregate and a step costs a few
multiplications.
"""

from __future__ import annotations

from dataclasses import dataclass

from backfill.sim.profiles import Profile

__all__ = ["StepCost"]


@dataclass(frozen=True, slots=True)
class StepCost:
    """Per-aggregate coefficients of the step-time roofline for one profile."""

    per_token_compute: float  # s per token (matmuls)
    per_pair_compute: float  # s per attention query-key pair
    weights_read: float  # s per step (weight bytes / bandwidth)
    per_kv_token_read: float  # s per KV token read
    comm_fixed: float  # s per step (all-reduce latencies)
    per_token_comm: float  # s per token (all-reduce transfer)
    step_overhead: float
    seq_overhead: float

    @classmethod
    def of(cls, profile: Profile) -> StepCost:
        flops = profile.peak_flops * profile.tp * profile.mfu
        bandwidth = profile.hbm_bandwidth * profile.tp * profile.mbu
        attn_dims = profile.heads * profile.head_dim
        if profile.tp > 1:
            ring = 2.0 * (profile.tp - 1) / profile.tp
            allreduces = 2 * profile.layers
            comm_fixed = allreduces * profile.allreduce_latency_s
            per_token_comm = (
                allreduces * profile.hidden * 2.0 * ring / profile.interconnect_bandwidth
            )
        else:
            comm_fixed = per_token_comm = 0.0
        return cls(
            per_token_compute=2.0 * profile.params / flops,
            per_pair_compute=4.0 * profile.layers * attn_dims / flops,
            weights_read=profile.weight_bytes / bandwidth,
            per_kv_token_read=profile.kv_bytes_per_token / bandwidth,
            comm_fixed=comm_fixed,
            per_token_comm=per_token_comm,
            step_overhead=profile.step_overhead_s,
            seq_overhead=profile.seq_overhead_s,
        )

    def seconds(self, tokens: int, pairs: float, kv_tokens: int, seqs: int) -> float:
        """Duration of a step with these aggregates (see the module docstring)."""
        compute = self.per_token_compute * tokens + self.per_pair_compute * pairs
        memory = self.weights_read + self.per_kv_token_read * kv_tokens
        comm = self.comm_fixed + self.per_token_comm * tokens if self.comm_fixed else 0.0
        return (
            (compute if compute > memory else memory)
            + comm
            + self.step_overhead
            + self.seq_overhead * seqs
        )
