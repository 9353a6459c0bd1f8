"""A real full disk under the local blob store: a small tmpfs (where the machine lets the tests
mount one; root in a sandbox or CI can) filled up while a batch runs. Checkpoints fail with
ENOSPC, the results wait in memory, and once space is freed the batch completes with every
line exactly once. (`test_results_kept.py` injects the same error at the blob seam on every
machine.)
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fault_harness import Rig, chat_line, check_invariant
from polling import poll_async

from backfill.domain.statuses import BatchStatus
from backfill.testing import start_upstream


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def fill(path: Path) -> int:
    """Write `path` until the disk is full; return the bytes written."""
    written = 0
    block = b"\0" * 65536
    with path.open("wb") as fh:
        while True:
            try:
                fh.write(block)
                fh.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
            written += len(block)
    return written


class Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(record.getMessage())


def test_a_full_disk_delays_checkpoints_and_loses_nothing(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", "4m") as disk, start_upstream() as upstream:
        rig = Rig(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", upstream.url, data_dir=disk)
        seen = Messages()
        logging.getLogger("backfill.worker").addHandler(seen)
        ids = [f"r{i}" for i in range(40)]
        filler = disk / "filler"

        async def main() -> None:
            # every request waits 0.3 s, so the disk fills before the first checkpoint
            lines = [chat_line(cid, f"{cid} #sleep:300") for cid in ids]
            batch_id = await rig.submit(lines)
            fill(filler)
            async with rig.service.background():
                await poll_async(lambda: any("checkpoint" in t for t in seen.texts))
                assert rig.batch(batch_id).status is BatchStatus.IN_PROGRESS
                filler.unlink()  # space again
                batch = await rig.wait_done(batch_id)
                assert batch.status is BatchStatus.COMPLETED
                outcome = await rig.outcome(batch_id)
            check_invariant(outcome, ids)
            assert len(outcome.output) == 40

        try:
            asyncio.run(main())
        finally:
            logging.getLogger("backfill.worker").removeHandler(seen)
            rig.close()
        failures = [t for t in seen.texts if "checkpoint" in t and "failed" in t]
        assert failures, seen.texts
        assert "No space left on device" in failures[0] or "os error 28" in failures[0]
