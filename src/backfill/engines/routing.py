"""`Router`: which replica of a model gets the next request. Pure: no I/O, no clock of its own.

`engines/replicas.py` does the sending and the probing and tells the router what happened
(`started`/`finished`, `succeeded`/`failed`, `observe` for the upstream's own load figures,
`recovered` after a health probe); the router keeps one `ReplicaState` per replica and answers
`pick(key, avoid)`. The policies (`routing` in the model's config):

- `least_loaded`: the healthy replica with the least load, where load is the requests this
  process has at it now (`in_flight`, exact and immediate) plus what its own metrics say it runs
  or queues beyond those (`external`: other clients, other backfill processes), read at the last
  scrape. Ties go round the replicas (a rotating start), so an idle set is filled evenly.
- `affinity` (the default): a bounded LRU map prefix group -> replica (`max_groups` groups). A
  request whose group is mapped goes to that replica (its prefix cache holds the group's
  prompt) unless that replica is *much busier* than the least-loaded one:
  `load > min_load * (1 + spill_ratio) + spill_margin`; then this one request goes to the
  least-loaded replica and the group stays mapped where its cache is. A new group (or one
  whose replica is drained) is mapped to the least-loaded replica. A request without a group
  (a short prompt) goes least-loaded.
- `round_robin`: in turn over the healthy replicas (the baseline of `bench/replicas.py`).

Health: an attempt that got no answer (refused, reset, timeout) drains its replica at once (a
probe tells within a second or two whether it is back, so a false alarm costs little); an
answer >= 500 counts a failure, and `drain_after` in a row drain it. A drained replica gets no
request until `recovered()` (a health probe answered). Probes of a replica drained again and
again without a success in between back off: the k-th drain in a row waits
`probe_interval * 2^(k-1)`, at most `max_probe_interval`, before its probe (`probe_due`). When
every replica is drained the least-loaded of them all still gets the request: the attempt fails
fast and the dispatcher's retry policy decides, rather than the router refusing work.

`avoid` is the replica the same request just failed on: it is passed over whenever another
replica can take the request, so a retry goes elsewhere.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

Routing = Literal["affinity", "least_loaded", "round_robin"]

#: prefix groups remembered per model (LRU)
MAX_GROUPS = 65536
#: a mapped replica is passed over when its load exceeds the least load times (1 + this) ...
SPILL_RATIO = 1.0
#: ... plus this many requests (as SGLang's cache-aware router: imbalance is both relative
#: and absolute; in one development run of `bench/replicas.py` (not reproducible from its
#: flags), 1.5x + 8 with a window of 64 over 4 replicas spilled so often that the hit rate
#: fell from 91% to 80%)
SPILL_MARGIN = 16
#: answers >= 500 in a row that drain a replica
DRAIN_AFTER = 3
#: seconds from a drain to the first health probe, doubling per drain in a row
PROBE_INTERVAL = 1.0
MAX_PROBE_INTERVAL = 30.0


@dataclass(slots=True)
class ReplicaState:
    """What the router knows of one replica."""

    in_flight: int = 0  # requests this process has at it now
    external: float = 0.0  # running + waiting at the upstream beyond ours (last scrape)
    failures: int = 0  # failed attempts since the last success
    drained: bool = False
    drained_at: float = 0.0
    drains: int = 0  # drains without a success in between (probe back-off)
    sent: int = 0  # attempts handed to it (cumulative)
    errors: int = 0  # failed attempts (cumulative)
    spilled: int = 0  # requests of its groups sent elsewhere because it was much busier

    @property
    def load(self) -> float:
        return self.in_flight + self.external


class Router:
    def __init__(
        self,
        replicas: int,
        routing: Routing = "affinity",
        *,
        max_groups: int = MAX_GROUPS,
        spill_ratio: float = SPILL_RATIO,
        spill_margin: float = SPILL_MARGIN,
        drain_after: int = DRAIN_AFTER,
        probe_interval: float = PROBE_INTERVAL,
        max_probe_interval: float = MAX_PROBE_INTERVAL,
    ) -> None:
        if replicas < 1:
            raise ValueError("a router needs at least one replica")
        self.routing: Routing = routing
        self.states = [ReplicaState() for _ in range(replicas)]
        self.max_groups = max_groups
        self.spill_ratio = spill_ratio
        self.spill_margin = spill_margin
        self.drain_after = drain_after
        self.probe_interval = probe_interval
        self.max_probe_interval = max_probe_interval
        self._groups: OrderedDict[int, int] = OrderedDict()
        self._turn = 0

    # -- choosing -------------------------------------------------------------------------
    def candidates(self, avoid: int | None = None) -> list[int]:
        """The replicas a request may go to: the healthy ones (all when none is), without
        `avoid` when another remains."""
        states = self.states
        pool = [i for i, s in enumerate(states) if not s.drained] or list(range(len(states)))
        if avoid is not None and len(pool) > 1:
            pool = [i for i in pool if i != avoid]
        return pool

    def pick(self, key: int | None = None, avoid: int | None = None) -> int:
        """The replica for a request of prefix group `key` (None: no group) that last failed on
        `avoid` (None: it did not)."""
        pool = self.candidates(avoid)
        if len(pool) == 1:
            chosen = pool[0]
        elif self.routing == "round_robin":
            chosen = pool[self._turn % len(pool)]
            self._turn += 1
        else:
            chosen = self._least_loaded(pool)
        if self.routing != "affinity" or key is None:
            return chosen
        groups = self._groups
        mapped = groups.get(key)
        if mapped is not None:
            groups.move_to_end(key)
            if mapped in pool:
                least = self.states[chosen].load
                if self.states[mapped].load <= least * (1 + self.spill_ratio) + self.spill_margin:
                    return mapped
                self.states[mapped].spilled += 1
                return chosen  # much busier: this request spills, the group stays mapped
            if mapped == avoid and not self.states[mapped].drained:
                return chosen  # this request's retry goes elsewhere; the group stays mapped
        groups[key] = chosen
        if len(groups) > self.max_groups:
            groups.popitem(last=False)
        return chosen

    def _least_loaded(self, pool: list[int]) -> int:
        states = self.states
        start = self._turn % len(pool)
        self._turn += 1
        best = pool[start]
        best_load = states[best].load
        for k in range(1, len(pool)):
            i = pool[(start + k) % len(pool)]
            if states[i].load < best_load:
                best, best_load = i, states[i].load
        return best

    def group_of(self, key: int) -> int | None:
        """The replica `key` is mapped to (tests, the bench)."""
        return self._groups.get(key)

    # -- what happened --------------------------------------------------------------------
    def started(self, i: int) -> None:
        state = self.states[i]
        state.in_flight += 1
        state.sent += 1

    def finished(self, i: int) -> None:
        self.states[i].in_flight -= 1

    def succeeded(self, i: int) -> None:
        state = self.states[i]
        state.failures = 0
        state.drains = 0

    def failed(self, i: int, *, answered: bool, now: float) -> bool:
        """An attempt at replica `i` failed: no answer (`answered` False) or an answer >= 500.
        Returns True when this drained the replica."""
        state = self.states[i]
        state.failures += 1
        state.errors += 1
        if state.drained or (answered and state.failures < self.drain_after):
            return False
        state.drained = True
        state.drained_at = now
        state.drains += 1
        return True

    def probe_due(self, i: int, now: float) -> bool:
        """Whether drained replica `i` should be probed now."""
        state = self.states[i]
        if not state.drained:
            return False
        wait = min(self.max_probe_interval, self.probe_interval * 2.0 ** (state.drains - 1))
        return now - state.drained_at >= wait

    def probe_failed(self, i: int, now: float) -> None:
        """A probe of drained replica `i` failed: wait the same interval again."""
        self.states[i].drained_at = now

    def recovered(self, i: int) -> None:
        """A probe of replica `i` answered: it takes requests again (`drains` is kept until a
        success, so a replica that fails again at once is probed later next time)."""
        state = self.states[i]
        state.drained = False
        state.failures = 0

    def observe(self, i: int, queued: float | None) -> None:
        """Replica `i`'s own figure of requests running + waiting (None: it serves none),
        read now: the part beyond this process's requests becomes its `external` load."""
        state = self.states[i]
        state.external = 0.0 if queued is None else max(0.0, queued - state.in_flight)
