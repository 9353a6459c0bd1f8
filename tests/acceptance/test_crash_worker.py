"""`kill -9` of a separate `backfill worker` while `backfill serve --no-worker` keeps running.

1. One worker, killed three times at seeded random moments of a 3,000-request batch, a new
   worker started after each kill: the batch completes, exactly once, and the re-sent requests
   stay within 3 x (max_concurrency + unflushed results).
2. Two workers, one killed and never restarted: the survivor takes over the dead worker's
   shards once their leases expire and finishes alone.

The API process never restarts, so the same SDK client watches the whole run.
"""

from __future__ import annotations

from pathlib import Path

from acceptance_settings import FAST_ENV
from durability import (
    CRASH_ENV,
    PER_KILL_BOUND,
    TaggedBatch,
    assert_exactly_once,
    client_for,
    kill_points,
    new_reruns,
    progress,
    wait_progress,
    write_config,
)
from polling import poll
from sdk_helpers import submit, wait_batch

from backfill.store.sql import SqlStore
from backfill.testing import UpstreamProcess
from backfill.testing.server import BackfillProcess

KEY = "sk-acceptance-crash-worker"
SEED = 7_000_001


class Cluster:
    def __init__(
        self, tmp_path: Path, upstream: UpstreamProcess, servers: list[BackfillProcess]
    ) -> None:
        self.data = tmp_path / "data"
        self.config = write_config(tmp_path / "backfill.toml", upstream)
        self.servers = servers
        self.env = {**FAST_ENV, **CRASH_ENV}
        self.api = self._add(
            BackfillProcess(
                self.data,
                api_keys=[KEY],
                extra_args=["--config", str(self.config), "--no-worker"],
                env=self.env,
            )
        )
        self.client = client_for(self.api.base_url, KEY)

    def _add(self, proc: BackfillProcess) -> BackfillProcess:
        self.servers.append(proc)
        return proc.start()

    def worker(self) -> BackfillProcess:
        return self._add(
            BackfillProcess(
                self.data,
                extra_args=["--config", str(self.config)],
                env=self.env,
                command="worker",
            )
        )

    def owners(self, batch_id: str) -> dict[str, int]:
        """Segment rows per recording worker id (rows stay after finalization)."""
        store = SqlStore(f"sqlite:///{self.data / 'backfill.db'}")
        try:
            per: dict[str, int] = {}
            for seg in store.segments(batch_id):
                per[seg.owner or "?"] = per.get(seg.owner or "?", 0) + seg.completed + seg.failed
            return per
        finally:
            store.close()


def alive(proc: BackfillProcess) -> bool:
    return proc.proc is not None and proc.proc.poll() is None


def test_kill_9_worker_three_times_exactly_once(
    tmp_path: Path, upstream: UpstreamProcess, servers: list[BackfillProcess]
) -> None:
    cluster = Cluster(tmp_path, upstream, servers)
    work = TaggedBatch(3000)
    batch = submit(cluster.client, work.lines())
    worker = cluster.worker()

    snapshots: list[dict[str, int]] = []
    at_kill: list[int] = []
    for fraction in kill_points(SEED):
        # each new worker records some work of its own before it is killed in turn
        target = max(int(fraction * work.n), (at_kill or [0])[-1] + 100)
        now = wait_progress(cluster.client, batch.id, target, lambda w=worker: alive(w))
        assert now.status == "in_progress" and alive(worker), (now, worker.logs())
        worker.kill()
        at_kill.append(progress(now))
        snapshots.append(work.seen(upstream))
        worker = cluster.worker()

    done = wait_batch(cluster.client, batch.id, timeout=90)
    assert_exactly_once(cluster.client, done, work.ids)
    final = work.seen(upstream)
    snapshots.append(final)
    reruns = [new_reruns(snapshots[k], snapshots[k + 1]) for k in range(len(at_kill))]
    total = sum(c - 1 for c in final.values())
    print(
        f"\ncrash worker: killed at recorded progress {at_kill} of {work.n}; "
        f"re-sent after each kill (until the next) {reruns} "
        f"(total {total}, bound {3 * PER_KILL_BOUND})"
    )
    assert sum(reruns) <= total <= 3 * PER_KILL_BOUND, (reruns, total)
    assert len(cluster.owners(batch.id)) == 4  # four worker processes recorded results


def test_two_workers_one_killed_the_other_finishes_alone(
    tmp_path: Path, upstream: UpstreamProcess, servers: list[BackfillProcess]
) -> None:
    cluster = Cluster(tmp_path, upstream, servers)
    work = TaggedBatch(3000)
    batch = submit(cluster.client, work.lines())
    doomed, survivor = cluster.worker(), cluster.worker()

    (fraction,) = kill_points(SEED + 1, n=1, low=0.2, high=0.6)
    now = wait_progress(
        cluster.client, batch.id, int(fraction * work.n), lambda: alive(doomed) and alive(survivor)
    )
    assert now.status == "in_progress" and alive(doomed), (now, doomed.logs())
    # both have recorded results, so the kill surely takes work away from the doomed one
    poll(lambda: cluster.owners(batch.id), lambda o: len(o) == 2, what="both workers to record")
    doomed.kill()
    before = work.seen(upstream)

    done = wait_batch(cluster.client, batch.id, timeout=90)
    assert alive(survivor), survivor.logs()
    assert_exactly_once(cluster.client, done, work.ids)
    final = work.seen(upstream)
    reruns = new_reruns(before, final)
    total = sum(c - 1 for c in final.values())
    owners = cluster.owners(batch.id)
    print(
        f"\ntwo workers: one killed at recorded progress {progress(now)} of {work.n}; "
        f"re-sent {reruns} (bound {3 * PER_KILL_BOUND}); results per worker {owners}"
    )
    # re-sends are of requests in flight or unflushed at the kill (a heartbeat stalled past
    # the lease on an overloaded machine could add a few more: those count in `total`)
    assert reruns <= total <= 3 * PER_KILL_BOUND, (reruns, total)
    assert len(owners) == 2 and sum(owners.values()) == work.n, owners
