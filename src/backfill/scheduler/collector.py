"""The debris collector: what crashes leave in the blob store and the store, removed later.

Every write path cleans up after itself when it fails, but a killed process cleans up nothing.
`collect_debris` finds and removes three kinds of leftovers:

1. Staging files of interrupted writes. In a local folder obstore streams an upload into
   `files/<id>#<n>` (5 MiB per part) and renames it into place when it is complete; a process
   killed meanwhile leaves the staging file behind, 5-20 MB each (`Blobs.list_staging`). One
   whose last write is older than `debris_grace_seconds` (1 h) is removed. An upload in
   progress is never collected: this process's own are left out by the blob store itself, and
   another process's write a part at least every 5 MiB (and a body that stalls is cut off after
   `http_body_idle_seconds`), so their last write is recent. Object stores keep unfinished
   multipart uploads out of sight; an S3 bucket needs a lifecycle rule
   (`AbortIncompleteMultipartUpload`) for those.
2. Segments of finished batches. Finalizing deletes `batches/<id>/` once its transition to a
   terminal status wins, and nothing ever deleted the shard and segment rows; a crash in
   between leaves both. For every terminal batch that still has rows
   (`Store.terminal_batches_with_segments`) the blobs go first and the rows second, so a crash
   in between leaves rows, which bring the batch back next time.
3. Segment blobs of terminal batches with no rows left: a stalled worker's segment written
   after its batch was finalized, when its own cleanup did not happen. Found by listing
   `batches/`, removed once their batch is terminal.

Orphan `files/` objects (an upload whose row was never inserted, a deleted file whose bytes
were not) are not collected: telling them apart from live files costs a store lookup per file.

It runs in the scheduler's retention step (`run_collector`), at most once per
`debris_interval_seconds` across every process that shares the store: the claim
`collect-debris` is taken for that long by an owner used only once and never released, so any
later attempt, from this process or another, fails until it expires. A collection that runs
longer than the interval may overlap the next one, which is harmless: every deletion here is
idempotent and every row deletion is conditional on the batch being terminal.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from backfill.blobs.base import Blobs
from backfill.domain import paths
from backfill.domain.ids import new_token
from backfill.domain.statuses import TERMINAL
from backfill.errors import BlobError, StoreError
from backfill.settings import Settings
from backfill.store.base import Store

log = logging.getLogger("backfill.scheduler")

CLAIM = "collect-debris"


@dataclass(frozen=True, slots=True)
class DebrisCounts:
    staging_files: int = 0
    staging_bytes: int = 0
    #: terminal batches whose leftover segment blobs and rows were removed
    batches: int = 0
    #: shard and segment rows removed
    rows: int = 0
    #: terminal batches whose segment blobs had no rows left
    orphan_batches: int = 0

    def __bool__(self) -> bool:
        return any((self.staging_files, self.batches, self.rows, self.orphan_batches))


async def collect_debris(
    store: Store, blobs: Blobs, now: float, *, grace_seconds: float, limit: int = 100
) -> DebrisCounts:
    """Remove the debris described in the module doc; at most `limit` batches of each kind."""
    staging_files = staging_bytes = 0
    async for info in blobs.list_staging():
        if now - info.last_modified > grace_seconds:
            await blobs.delete_staging(info.path)
            staging_files += 1
            staging_bytes += info.size

    rows = 0
    finished = await asyncio.to_thread(store.terminal_batches_with_segments, limit)
    for batch_id in finished:
        await blobs.delete_prefix(paths.batch_prefix(batch_id))
        rows += await asyncio.to_thread(store.delete_segments, batch_id)

    seen: set[str] = set()
    async for info in blobs.list_prefix(paths.BATCHES):
        of = paths.batch_of(info.path)
        if of is not None and of not in finished:
            seen.add(of)
    orphans = 0
    for batch_id in sorted(seen):  # live batches are skipped, not counted against `limit`
        if orphans >= limit:
            break
        batch = await asyncio.to_thread(store.get_batch, batch_id)
        if batch is not None and batch.status in TERMINAL:
            await blobs.delete_prefix(paths.batch_prefix(batch_id))
            orphans += 1
    return DebrisCounts(staging_files, staging_bytes, len(finished), rows, orphans)


async def run_collector(
    store: Store, blobs: Blobs, settings: Settings, owner: str, now: float
) -> DebrisCounts | None:
    """`collect_debris` if no process has run it in the last `debris_interval_seconds`
    (None when skipped). Failures are logged, never raised: the next interval tries again."""
    try:
        once = f"{owner}:{new_token()[:8]}"
        if not await asyncio.to_thread(
            store.claim, CLAIM, once, now, settings.debris_interval_seconds
        ):
            return None
        counts = await collect_debris(
            store, blobs, now, grace_seconds=settings.debris_grace_seconds
        )
    except (StoreError, BlobError) as exc:  # an outage: one line, no traceback
        log.warning("debris collection failed (%s); it runs again later", exc.message)
        return None
    except Exception:
        log.exception("debris collection failed; it runs again later")
        return None
    if counts:
        log.info(
            "debris: removed %d staging files (%d bytes), the segments of %d finished batches "
            "(%d rows) and %d batches' orphan segment blobs",
            counts.staging_files,
            counts.staging_bytes,
            counts.batches,
            counts.rows,
            counts.orphan_batches,
        )
    return counts
