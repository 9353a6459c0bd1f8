"""Where things live in the blob store: every object path backfill writes is named here.

```
files/<file_id>                                   an uploaded file, or a batch's output/error file
batches/<batch_id>/seg/<shard>-<seq>-<token>      a segment of results (shard run, checkpoint)
health/<token>                                    the readiness probe's scratch object
```

Everything a running batch writes lives under `batches/<batch_id>/`, so finalizing and the
debris collector remove it by prefix, and `batch_of` tells which batch a listed object
belongs to. A segment's name carries its shard, the checkpoint's sequence number and the start
of the lease token: a worker that lost its lease writes under another name than the new owner,
so it can never overwrite the new owner's results. The paths are stored in the store's rows
(`blob_path`), so changing a layout here needs no migration but leaves old objects where they
were. Staging files (`<path>#<n>`) are obstore's own naming and stay in `blobs/`.
"""

from __future__ import annotations

FILES = "files"
BATCHES = "batches"
HEALTH = "health"


def file_path(file_id: str) -> str:
    """An uploaded file, or a batch's output or error file."""
    return f"{FILES}/{file_id}"


def batch_prefix(batch_id: str) -> str:
    """Everything the batch's shard runs write (`Blobs.delete_prefix` takes it as it is)."""
    return f"{BATCHES}/{batch_id}"


def segment_path(batch_id: str, shard_index: int, seq: int, token: str) -> str:
    """Checkpoint `seq` of a shard run under the lease `token`."""
    return f"{BATCHES}/{batch_id}/seg/{shard_index:05d}-{seq:06d}-{token[:12]}"


def batch_of(path: str) -> str | None:
    """The batch an object under `batches/<batch_id>/` belongs to; None for any other path."""
    root, _, rest = path.partition("/")
    batch_id, inside, _ = rest.partition("/")
    return batch_id if root == BATCHES and inside and batch_id else None


def probe_path(token: str) -> str:
    """The object the readiness probe writes and deletes."""
    return f"{HEALTH}/{token}"
