"""Which batch a free worker should serve next: at-risk first, then fair shares between
projects, then earliest deadline first.

- A batch is *at risk* when, at the rate it has run so far, it would finish after its
  `expires_at`. At-risk batches go first (earliest deadline among them), which gives them a
  larger share of the workers until they are back on track.
- Otherwise projects share the workers by weight: the project with the fewest live leases per
  unit of weight goes next, so two projects of weight 1 each get half the shards in flight,
  whatever the number or size of their batches.
- Within a project, earliest deadline first, then the oldest batch.

Weights come from the projects' own settings (`backfill projects set --weight`), falling back
to `Settings.project_weights` (`merged_weights`); workers re-read them every few seconds, so a
change applies to the next shards leased, without a restart.

Pure functions over plain values: the stores gather the candidates and apply the order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Candidate:
    batch_id: str
    project: str  # project name (weights are configured by name)
    seq: int
    expires_at: int
    total: int
    done: int
    in_progress_at: int | None


def estimated_completion(
    total: int, done: int, in_progress_at: int | None, now: float
) -> float | None:
    """When the batch finishes at the rate it has run so far (None before any result)."""
    if in_progress_at is None or done <= 0:
        return None
    elapsed = max(now - in_progress_at, 1.0)
    rate = done / elapsed
    return now + max(total - done, 0) / rate


def at_risk(c: Candidate, now: float) -> bool:
    eta = estimated_completion(c.total, c.done, c.in_progress_at, now)
    return eta is not None and eta > c.expires_at


def order_candidates(
    candidates: Sequence[Candidate],
    live_leases: Mapping[str, int],
    weights: Mapping[str, float] | None,
    now: float,
) -> list[Candidate]:
    """Candidates in the order a worker should try to lease from them."""
    weights = weights or {}

    def share(project: str) -> float:
        w = weights.get(project, 1.0)
        return live_leases.get(project, 0) / (w if w > 0 else 1e-9)

    def key(c: Candidate) -> tuple[int, float, int, int]:
        if at_risk(c, now):
            return (0, 0.0, c.expires_at, c.seq)
        return (1, share(c.project), c.expires_at, c.seq)

    return sorted(candidates, key=key)


def merged_weights(
    configured: Mapping[str, float], own: Iterable[tuple[str, float | None]]
) -> dict[str, float]:
    """Weights by project name: each project's own weight where set, else the configured one."""
    weights = dict(configured)
    weights.update((name, w) for name, w in own if w is not None)
    return weights


def admission_warning(
    total: int,
    expires_at: int,
    ahead: int,
    rate: float | None,
    now: float,
) -> str | None:
    """A warning for a batch that, at the measured rate of its model, would finish after its
    deadline: `ahead` requests of the same model are due first. None when it fits or when no
    rate has been measured yet (nothing to go on)."""
    if rate is None or rate <= 0:
        return None
    eta = now + (ahead + total) / rate
    if eta <= expires_at:
        return None
    return (
        f"At the measured rate of about {rate:.1f} requests/s for this model, with {ahead} "
        f"requests due before it, this batch would finish around {int(eta)}, after its "
        f"completion window ends at {expires_at}. It will run anyway; finished results are "
        "kept if it expires."
    )
