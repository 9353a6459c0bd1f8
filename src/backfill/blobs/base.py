"""The blob interface: put, get (whole, streamed or by range), size and delete by path.

Paths are relative, slash-separated (`files/file-abc`, `batches/batch_x/seg/00003-00001`).
Everything is async because object stores are remote; the local folder is just one of them.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import Protocol


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
