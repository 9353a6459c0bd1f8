"""Per-request sampling for transformers' continuous batching (imports torch: load lazily).

transformers' continuous batching samples every row of a batch with one global `do_sample` flag
and the global torch RNG, so a request's tokens depend on whatever else shares its batch, and a
`seed` cannot be honoured. We run the manager greedy (`do_sample=False`, so it takes the argmax)
and put our own logits processors in front of that argmax:

1. `Temperature`: divides each row by its request's temperature (greedy rows keep 1.0);
2. `TopP`: nucleus filtering per row, skipped outright when no row asks for it;
3. `Sampler`: draws the token itself by inverse-CDF with a uniform number derived from
   (request seed, choice index, token position) by a counter-based hash (splitmix64), and
   leaves only that token finite. Greedy rows (temperature 0) pass through untouched.

So a seeded request gives the same tokens whatever else is in its batch, up to floating-point
differences in the batched forward pass itself. Each processor carries one value per row (the
manager's argument tensor is int32; floats travel bit-cast, as the built-in processors do).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingLogitsProcessorList,
)
from transformers.generation.logits_process import LogitsProcessorList

MASK64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finalizer: a well-spread 64-bit hash of a 64-bit int."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def uniform(seed: int, stream: int, step: int) -> float:
    """A uniform number in [0, 1) with 24 random bits (exact in float32)."""
    x = _mix((seed & MASK64) ^ _mix(((stream & 0xFFFFFFFF) << 32) | (step & 0xFFFFFFFF)))
    return (x >> 40) / float(1 << 24)


def _floats_as_int32(values: list[float]) -> Any:
    return torch.tensor(values, dtype=torch.float32).view(dtype=torch.int32)


def _fill_float(int32_tensor: Any, value: float) -> None:
    default = torch.empty_like(int32_tensor, dtype=torch.float32)
    default.fill_(value)
    int32_tensor.copy_(default.view(dtype=torch.int32))


class Temperature(ContinuousBatchingLogitsProcessor):  # type: ignore[misc]
    supported_kwargs: dict[str, type] = {"temperature": float}
    ignored_kwargs: tuple[str, ...] = ()

    def fill_defaults(self, int32_tensor: Any) -> None:
        _fill_float(int32_tensor, 1.0)

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> Any:
        temps = []
        for request in requests_with_new_token:
            t = request.state.logit_processor_kwargs.get("temperature", 1.0)
            temps.append(t if t > 0 else 1.0)
        return _floats_as_int32(temps)

    def __call__(self, scores: Any, tensor_arg: Any) -> Any:
        temps = tensor_arg[: scores.size(0)].view(dtype=torch.float32)
        return scores / temps.unsqueeze(-1)


class TopP(ContinuousBatchingLogitsProcessor):  # type: ignore[misc]
    supported_kwargs: dict[str, type] = {"top_p": float}
    ignored_kwargs: tuple[str, ...] = ()

    def fill_defaults(self, int32_tensor: Any) -> None:
        _fill_float(int32_tensor, 1.0)

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> Any:
        return _floats_as_int32(
            [r.state.logit_processor_kwargs.get("top_p", 1.0) for r in requests_with_new_token]
        )

    def __call__(self, scores: Any, tensor_arg: Any) -> Any:
        top_p = tensor_arg[: scores.size(0)].view(dtype=torch.float32)
        if not bool((top_p < 1.0).any()):
            return scores
        sorted_logits, sorted_idx = torch.sort(scores, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p).unsqueeze(-1)
        remove[..., -1:] = False  # always keep the most likely token
        mask = remove.scatter(-1, sorted_idx, remove)
        return scores.masked_fill(mask, float("-inf"))


class Sampler(ContinuousBatchingLogitsProcessor):  # type: ignore[misc]
    """Draws the next token per row; -1 in a row's argument means greedy."""

    supported_kwargs: dict[str, type] = {"seed": int, "stream": int}
    ignored_kwargs: tuple[str, ...] = ()

    def fill_defaults(self, int32_tensor: Any) -> None:
        _fill_float(int32_tensor, -1.0)

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> Any:
        draws = []
        for request in requests_with_new_token:
            state = request.state
            kw = state.logit_processor_kwargs
            if kw.get("temperature", 1.0) <= 0:
                draws.append(-1.0)
            else:
                draws.append(uniform(kw.get("seed", 0), kw.get("stream", 0), state.generated_len()))
        return _floats_as_int32(draws)

    def __call__(self, scores: Any, tensor_arg: Any) -> Any:
        u = tensor_arg[: scores.size(0)].view(dtype=torch.float32)
        sample = u >= 0
        if not bool(sample.any()):
            return scores
        cdf = torch.softmax(scores.float(), dim=-1).cumsum(dim=-1)
        target = (u.clamp(min=0.0) * cdf[:, -1]).unsqueeze(-1)
        idx = torch.searchsorted(cdf, target, right=True).clamp(max=scores.size(-1) - 1)
        picked = torch.full_like(scores, float("-inf")).scatter_(1, idx, 0.0)
        return torch.where(sample.unsqueeze(-1), picked, scores)


def processors() -> Any:
    """The processor list to install on a `ContinuousBatchingManager` before it starts."""
    plist = ContinuousBatchingLogitsProcessorList(
        LogitsProcessorList([Temperature(), TopP(), Sampler()]), per_request_processors=False
    )
    plist.tensors_required = 3
    return plist
