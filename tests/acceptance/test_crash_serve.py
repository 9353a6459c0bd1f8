"""`kill -9` of `backfill serve` (API + scheduler + worker in one process) three times in the
middle of a 3,000-request batch, restarted on the same data dir each time.

What must hold (DESIGN.md, durability rules): the batch completes; every custom_id is in the
output exactly once; and the upstream is sent a request again only when it was in flight or
answered-but-unflushed at a kill, so the re-sent requests stay within
3 x (max_concurrency + unflushed results). The measured re-sends per kill are printed
(`pytest -s` shows them).
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
from sdk_helpers import submit, wait_batch

from backfill.testing import UpstreamProcess
from backfill.testing.server import BackfillProcess

KEY = "sk-acceptance-crash-serve"
SEED = 20261125


def test_kill_9_serve_three_times_exactly_once(
    tmp_path: Path, upstream: UpstreamProcess, servers: list[BackfillProcess]
) -> None:
    config = write_config(tmp_path / "backfill.toml", upstream)
    data = tmp_path / "data"

    def start() -> BackfillProcess:
        proc = BackfillProcess(
            data,
            api_keys=[KEY],
            extra_args=["--config", str(config)],
            env={**FAST_ENV, **CRASH_ENV},
        )
        servers.append(proc)
        return proc.start()

    work = TaggedBatch(3000)
    proc = start()
    client = client_for(proc.base_url, KEY)
    batch = submit(client, work.lines())

    snapshots: list[dict[str, int]] = []
    at_kill: list[int] = []
    for fraction in kill_points(SEED):
        # each restarted process records some work of its own before it is killed in turn
        target = max(int(fraction * work.n), (at_kill or [0])[-1] + 100)
        now = wait_progress(client, batch.id, target, lambda p=proc: p.proc.poll() is None)  # type: ignore[union-attr]
        assert now.status == "in_progress", (now, proc.logs())
        proc.kill()
        at_kill.append(progress(now))
        snapshots.append(work.seen(upstream))
        proc = start()
        client = client_for(proc.base_url, KEY)

    done = wait_batch(client, batch.id, timeout=90)
    assert_exactly_once(client, done, work.ids)

    final = work.seen(upstream)
    snapshots.append(final)
    assert set(final) == {f"{work.tag} {cid} #sleep:5" for cid in work.ids}
    reruns = [new_reruns(snapshots[k], snapshots[k + 1]) for k in range(len(at_kill))]
    total = sum(c - 1 for c in final.values())
    print(
        f"\ncrash serve: killed at recorded progress {at_kill} of {work.n}; "
        f"re-sent after each kill (until the next) {reruns} "
        f"(total {total}, bound {3 * PER_KILL_BOUND})"
    )
    assert sum(reruns) <= total <= 3 * PER_KILL_BOUND, (reruns, total)
