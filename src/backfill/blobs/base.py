"""The blob interface: put, get (whole, streamed or by range), size and delete by path.

Paths are relative, slash-separated (`files/file-abc`, `batches/batch_x/seg/00003-00001`).
Everything is async because object stores are remote; the local folder is just one of them.

Listing serves the debris collector (`scheduler/collector.py`): `list_prefix` lists stored
objects; `list_staging` lists partial writes a crash can leave behind, which are not objects
yet and so never show in `list_prefix`.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import NamedTuple, Protocol


class BlobInfo(NamedTuple):
    path: str
    size: int
    #: Unix seconds of the last write
    last_modified: float


class Blobs(Protocol):
    async def put(self, path: str, data: bytes) -> None:
        """Write a whole object atomically (overwrites)."""

    async def put_stream(self, path: str, chunks: AsyncIterable[bytes]) -> int:
        """Stream chunks into an object; return its size. If `chunks` raises, nothing is left
        at `path` and the exception propagates."""

    async def get(self, path: str) -> bytes:
        """A whole (small) object. `BlobNotFound` if missing."""

    def stream(
        self, path: str, start: int = 0, end: int | None = None, chunk_size: int = 1 << 20
    ) -> AsyncIterator[bytes]:
        """Stream bytes [start, end) of an object in chunks."""

    async def get_range(self, path: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of an object."""

    async def size(self, path: str) -> int: ...

    async def exists(self, path: str) -> bool: ...

    async def delete(self, path: str) -> None:
        """Remove an object; missing objects are fine."""

    async def delete_prefix(self, prefix: str) -> None:
        """Remove every object under `prefix`."""

    def list_prefix(self, prefix: str) -> AsyncIterator[BlobInfo]:
        """Every stored object under `prefix` (whole path segments: `batches/b1` lists
        `batches/b1/...`, not `batches/b10/...`), in no particular order."""

    def list_staging(self) -> AsyncIterator[BlobInfo]:
        """Partial writes a crash can leave behind, with the time of their last write: in a
        local folder, the staging files (`<path>#<n>`) obstore writes an object to before it
        renames it into place. Writes this process is making right now are left out. Object
        stores show none (an unfinished S3 multipart upload is invisible; a bucket lifecycle
        rule aborts it), nor does memory."""

    async def delete_staging(self, path: str) -> None:
        """Remove a partial write `list_staging` found; a missing one is fine."""
