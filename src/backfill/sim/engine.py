"""The simulated engine core: vLLM v1's scheduler over a simulated clock, without I/O.

`Engine.add()` queues a request; `Engine.step()` schedules one batch, charges its duration from
the roofline (`roofline.py`) to the simulated clock `Engine.now`, and applies its results: which
requests produced a token, which finished. Nothing here sleeps or touches a socket: the HTTP
server (`server.py`) paces steps against wall time, and `Simulator.run_offline` (`offline.py`)
runs them back to back.

Scheduling, one step (vLLM v1 `Scheduler.schedule`, priority policy):

1. Token budget = `max_num_batched_tokens`. Running requests in admission order each get the
   tokens they still need (1 for a decoding request; the rest of the prompt, up to the remaining
   budget, for one still prefilling: chunked prefill). Admission order puts decodes first: a
   partially prefilled request is always the last one admitted.
   With `long_prefill_token_threshold` > 0 (vLLM's `--long-prefill-token-threshold`), no
   request gets more than that many prefill tokens in one step, running or newly admitted.
2. If a running request needs a KV block and none is free, the engine preempts (recompute
   mode) the running request with the largest `(priority, arrival)` - lowest priority, latest
   arrival - possibly the request itself: it releases its blocks, its computed tokens reset to
   0 and it returns to the waiting queue. Its generated tokens are kept and recomputed with the
   prompt when it is admitted again (its prompt blocks are often still in the prefix cache).
3. Only if nothing was preempted in this step, waiting requests are admitted in
   `(priority, arrival)` order while the budget lasts, fewer than `max_num_seqs` run and their
   blocks fit (no preemption on behalf of a waiting request, as in vLLM). On admission the
   prefix cache is consulted; hit tokens count as computed and skip prefill work.

Results: a request whose computed tokens reach its length samples one token. The first token
marks TTFT; a request finishes after exactly `max_tokens` tokens (`finish_reason=length`).
Full prompt blocks enter the prefix cache as they are computed.

Per step, the engine walks only the running list (a few hundred requests at most) with plain
integer arithmetic; the waiting queue is a heap.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

from backfill.sim.kvcache import KVCache
from backfill.sim.metrics import EngineMetrics
from backfill.sim.profiles import Profile
from backfill.sim.roofline import StepCost
from backfill.sim.tokens import Prompt

__all__ = ["Engine", "SimRequest", "StepResult"]

WAITING, RUNNING, FINISHED, ABORTED = 0, 1, 2, 3


class SimRequest:
    """One request's state in the engine. Read freely; only the engine mutates it."""

    __slots__ = (
        "arrival",
        "block_hashes",
        "cached_tokens",
        "client",
        "finish_time",
        "first_scheduled",
        "first_token_time",
        "last_token_time",
        "max_tokens",
        "num_blocks",
        "num_committed",
        "num_computed",
        "num_output",
        "num_scheduled",
        "preemptions",
        "priority",
        "prompt_len",
        "request_id",
        "seq",
        "shared",
        "status",
    )

    def __init__(
        self,
        request_id: str,
        prompt: Prompt,
        max_tokens: int,
        *,
        priority: int = 0,
        arrival: float = 0.0,
        client: Any = None,
    ) -> None:
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        self.request_id = request_id
        self.prompt_len = prompt.num_tokens
        self.block_hashes = prompt.block_hashes
        self.max_tokens = max_tokens
        self.priority = priority
        self.arrival = arrival
        self.client = client  # whatever the caller needs back (the HTTP exchange)
        self.seq = 0
        self.status = WAITING
        self.num_computed = 0  # tokens whose KV is in the cache
        self.num_output = 0  # tokens generated
        self.num_scheduled = 0  # tokens scheduled in the current step
        self.num_blocks = 0
        self.num_committed = 0  # full prompt blocks looked at for caching
        self.shared: list[int] = []
        self.cached_tokens = -1  # prefix-cache hit at first admission (-1: not yet admitted)
        self.preemptions = 0
        self.first_scheduled = -1.0
        self.first_token_time = -1.0
        self.last_token_time = -1.0
        self.finish_time = -1.0

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    def timings(self) -> dict[str, float]:
        """Simulated latencies in seconds: queue_s, ttft_s, tpot_s, e2e_s (finished requests)."""
        tpot = (
            (self.finish_time - self.first_token_time) / (self.num_output - 1)
            if self.num_output > 1
            else 0.0
        )
        return {
            "queue_s": self.first_scheduled - self.arrival,
            "ttft_s": self.first_token_time - self.arrival,
            "tpot_s": tpot,
            "e2e_s": self.finish_time - self.arrival,
        }


@dataclass(slots=True)
class StepResult:
    """What one step did: its duration and the requests that produced a token / finished."""

    duration: float
    emitted: list[SimRequest]
    finished: list[SimRequest]
    num_tokens: int
    num_seqs: int
    preempted: int


class Engine:
    """vLLM v1-style continuous batching on a simulated clock (see the module docstring)."""

    def __init__(self, profile: Profile, *, now: float = 0.0) -> None:
        self.profile = profile
        self.cost = StepCost.of(profile)
        self.kv = KVCache(profile.num_gpu_blocks, profile.block_size)
        self.metrics = EngineMetrics()
        # vLLM refuses to start when one sequence of max_model_len cannot fit in the cache;
        # the simulator caps the accepted length instead (small test profiles stay usable).
        self.max_len = min(profile.max_model_len, self.kv.num_blocks * profile.block_size)
        self.now = now
        self.running: list[SimRequest] = []
        self.waiting: list[tuple[int, float, int, SimRequest]] = []  # heap
        self._seq = 0
        self._preempted_in_step = 0

    # ---- queue ---------------------------------------------------------------------------
    def add(self, request: SimRequest) -> None:
        """Queue a request (its `arrival` should be <= `now`; defaults to `now` if later)."""
        length = request.prompt_len + request.max_tokens
        if length > self.max_len:
            raise ValueError(
                f"request of {length} tokens exceeds the maximum of {self.max_len} tokens"
            )
        if request.arrival > self.now:
            request.arrival = self.now
        self._seq += 1
        request.seq = self._seq
        request.status = WAITING
        heapq.heappush(self.waiting, (request.priority, request.arrival, request.seq, request))

    def abort(self, request: SimRequest) -> None:
        """Drop a request (client went away): free its blocks, never schedule it again."""
        if request.status == RUNNING:
            self.running.remove(request)
            self.kv.release(request)
        elif request.status == WAITING:
            self.waiting = [e for e in self.waiting if e[3] is not request]
            heapq.heapify(self.waiting)
        else:
            return
        request.status = ABORTED
        self.metrics.requests_aborted += 1

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # ---- one step ------------------------------------------------------------------------
    def _preempt(self, victim: SimRequest) -> None:
        self.kv.release(victim)
        victim.num_computed = 0
        victim.num_committed = 0
        victim.num_scheduled = 0
        victim.preemptions += 1
        victim.status = WAITING
        heapq.heappush(self.waiting, (victim.priority, victim.arrival, victim.seq, victim))
        self.metrics.preemptions += 1
        self._preempted_in_step += 1

    def schedule(self) -> list[SimRequest]:
        """Pick this step's batch; sets `num_scheduled` on each scheduled request."""
        profile = self.profile
        block_size = profile.block_size
        kv = self.kv
        running = self.running
        budget = profile.max_num_batched_tokens
        threshold = profile.long_prefill_token_threshold
        scheduled: list[SimRequest] = []
        preempted = False
        index = 0
        while index < len(running) and budget > 0:
            request = running[index]
            new = request.prompt_len + request.num_output - request.num_computed
            if 0 < threshold < new:
                new = threshold
            if new > budget:
                new = budget
            need = -(-(request.num_computed + new) // block_size) - request.num_blocks
            admitted = True
            while need > 0 and not kv.allocate(request, need):
                victim = max(running, key=_victim_key)
                position = running.index(victim)
                del running[position]
                if victim.num_scheduled:
                    budget += victim.num_scheduled
                    scheduled.remove(victim)
                self._preempt(victim)
                preempted = True
                if victim is request:
                    admitted = False
                    break
                if position < index:
                    index -= 1
            if not admitted:
                break
            request.num_scheduled = new
            budget -= new
            scheduled.append(request)
            index += 1
        if preempted:
            return scheduled
        waiting = self.waiting
        metrics = self.metrics
        max_seqs = profile.max_num_seqs
        while waiting and budget > 0 and len(running) < max_seqs:
            request = waiting[0][3]
            total = request.prompt_len + request.num_output
            hits, idle = kv.match(request.block_hashes, total)
            hit_tokens = hits * block_size
            new = total - hit_tokens
            if 0 < threshold < new:
                new = threshold
            if new > budget:
                new = budget
            need = -(-(hit_tokens + new) // block_size) - hits
            if need > kv.num_free - idle:
                break
            heapq.heappop(waiting)
            kv.acquire(request, request.block_hashes, hits)
            kv.allocate(request, need)
            metrics.prefix_queries += total
            metrics.prefix_hits += hit_tokens
            request.num_computed = hit_tokens
            request.num_committed = hits
            if request.cached_tokens < 0:
                request.cached_tokens = hit_tokens
                request.first_scheduled = self.now
                metrics.queue.observe(self.now - request.arrival)
            request.status = RUNNING
            request.num_scheduled = new
            budget -= new
            running.append(request)
            scheduled.append(request)
        return scheduled

    def step(self) -> StepResult | None:
        """Schedule and run one step, advancing `now`; None when there is nothing to do."""
        self._preempted_in_step = 0
        scheduled = self.schedule()
        if not scheduled:
            if self.waiting and not self.running:
                raise RuntimeError("a waiting request can never fit in the KV cache")
            return None
        tokens = kv_tokens = 0
        pairs = 0.0
        for request in scheduled:
            new = request.num_scheduled
            context = request.num_computed
            tokens += new
            kv_tokens += context + new
            pairs += new * (context + (new + 1) * 0.5)
        start = self.now
        duration = self.cost.seconds(tokens, pairs, kv_tokens, len(scheduled))
        now = self.now = start + duration
        metrics = self.metrics
        metrics.steps += 1
        metrics.busy_s += duration
        tpot = metrics.tpot
        kv = self.kv
        block_size = self.profile.block_size
        emitted: list[SimRequest] = []
        finished: list[SimRequest] = []
        on_time = 0  # inter-token intervals equal to this step's duration (observed at once)
        interval = now - start
        for request in scheduled:
            computed = request.num_computed + request.num_scheduled
            request.num_computed = computed
            request.num_scheduled = 0
            prompt_len = request.prompt_len
            if request.num_committed * block_size + block_size <= prompt_len:
                full = (computed if computed < prompt_len else prompt_len) // block_size
                hashes = request.block_hashes
                for block in range(request.num_committed, full):
                    kv.commit(request, hashes[block])
                if full > request.num_committed:
                    request.num_committed = full
            if computed < prompt_len + request.num_output:
                continue  # a prefill chunk that did not reach the end of the sequence
            output = request.num_output + 1
            request.num_output = output
            emitted.append(request)
            if output == 1:
                request.first_token_time = now
                metrics.prompt_tokens += prompt_len
                metrics.ttft.observe(now - request.arrival)
            else:
                gap = now - request.last_token_time
                if gap == interval:
                    on_time += 1
                else:
                    tpot.observe(gap)
            request.last_token_time = now
            if output >= request.max_tokens:
                request.status = FINISHED
                request.finish_time = now
                kv.release(request)
                finished.append(request)
                metrics.e2e.observe(now - request.arrival)
        if on_time:
            tpot.observe(interval, on_time)
        metrics.generation_tokens += len(emitted)
        if finished:
            metrics.requests_finished += len(finished)
            self.running = [r for r in self.running if r.status == RUNNING]
        return StepResult(
            duration, emitted, finished, tokens, len(scheduled), self._preempted_in_step
        )


def _victim_key(request: SimRequest) -> tuple[int, float, int]:
    return (request.priority, request.arrival, request.seq)
