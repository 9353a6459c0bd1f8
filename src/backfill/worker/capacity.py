"""How much more work a model can take: the worker's test before it leases another shard.

A model's room is its dispatcher's `limit` minus the requests expected to want a slot:

- what the dispatcher holds now (`held`: at the engine, waiting for a slot, deferred), which
  covers every shard already dispatching;
- plus the demand of shards leased moments ago (`starting`): they are still reading their
  batch and input, and their requests do not show in the dispatcher yet. Counted as starting
  for `STARTING_SECONDS`, so for a while a shard may be counted twice (conservative);
- never more than the running shards' total demand (`demand`: what each may keep started at
  once, `min(requests left, in_hand)`), which the double count could exceed.

A shard's demand is a bound, not a promise: a 2,000-request shard keeps `in_hand()` requests
started (at least the window), so one large shard fills its model and the worker leases no
more of it beyond `worker_shards`, while 16 one-request shards are 16 requests and leave a
window of 256 with room for 240 more.

Requests sleeping between retries are not held, so a throttled model may look roomier than it
is; the governor's limit (halved on 429/503) and the worker's `worker_max_shards` bound that.

Pure arithmetic over plain values; the worker reads the dispatchers and its runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

#: a shard leased less than this long ago counts its demand as still to come
STARTING_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class RunningShard:
    """One shard a worker runs: its batch's model and the requests it may hold at once."""

    model: str | None
    demand: int
    leased_at: float  # monotonic seconds

    def starting(self, now: float) -> bool:
        return now - self.leased_at < STARTING_SECONDS


def room(limit: int, held: int, shards: Iterable[RunningShard], now: float) -> int:
    """Requests the model can still take beyond what its running `shards` will send (<= 0:
    none). `held`: requests its dispatcher holds now (in flight, waiting, deferred)."""
    demand = starting = 0
    for shard in shards:
        demand += shard.demand
        if shard.starting(now):
            starting += shard.demand
    return limit - min(demand, held + starting)


def full_models(
    loads: dict[str, tuple[int, int]], shards: Iterable[RunningShard], now: float
) -> tuple[frozenset[str], bool]:
    """The models without room, and whether any model has room. `loads`: each served model's
    (limit, held)."""
    by_model: dict[str, list[RunningShard]] = {}
    for shard in shards:
        if shard.model is not None:
            by_model.setdefault(shard.model, []).append(shard)
    full = frozenset(
        model
        for model, (limit, held) in loads.items()
        if room(limit, held, by_model.get(model, ()), now) <= 0
    )
    return full, len(full) < len(loads)
