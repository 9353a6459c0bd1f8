"""`Blobs` over obstore: memory (tests), a local folder (default) or S3/GCS/Azure by URL.

obstore streams in both directions without holding whole objects in memory; an upload of an
async iterator becomes a multipart upload, which is aborted if the iterator raises, so a
failed or oversize upload leaves nothing behind (we delete defensively too).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Any

import obstore
from obstore.exceptions import NotFoundError
from obstore.store import LocalStore, MemoryStore, from_url

from backfill.errors import BlobError, BlobNotFound

_NOT_FOUND = (NotFoundError, FileNotFoundError)


class ObjectBlobs:
    def __init__(self, store: Any, description: str) -> None:
        self._store = store
        self.description = description

    def __repr__(self) -> str:
        return f"ObjectBlobs({self.description})"

    async def put(self, path: str, data: bytes) -> None:
        try:
            await obstore.put_async(self._store, path, data)
        except Exception as exc:
            raise BlobError(f"cannot write {path}: {exc}") from exc

    async def put_stream(self, path: str, chunks: AsyncIterable[bytes]) -> int:
        size = 0

        async def counted() -> AsyncIterator[bytes]:
            nonlocal size
            async for chunk in chunks:
                size += len(chunk)
                yield chunk

        try:
            await obstore.put_async(
                self._store, path, counted(), chunk_size=5 << 20, max_concurrency=2
            )
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await obstore.delete_async(self._store, path)
            if isinstance(exc, Exception) and "obstore" in type(exc).__module__:
                raise BlobError(f"cannot write {path}: {exc}") from exc
            raise
        return size

    async def get(self, path: str) -> bytes:
        try:
            result = await obstore.get_async(self._store, path)
            return bytes(await result.bytes_async())
        except _NOT_FOUND as exc:
            raise BlobNotFound(f"object {path} not found") from exc
        except Exception as exc:
            raise BlobError(f"cannot read {path}: {exc}") from exc

    async def stream(
        self, path: str, start: int = 0, end: int | None = None, chunk_size: int = 1 << 20
    ) -> AsyncIterator[bytes]:
        if end is not None and end <= start:
            return
        options: dict[str, Any] = {}
        if start or end is not None:
            options["range"] = (start, end) if end is not None else {"offset": start}
        try:
            result = await obstore.get_async(self._store, path, options=options or None)  # type: ignore[arg-type]
            async for chunk in result.stream(min_chunk_size=chunk_size):
                yield bytes(chunk)
        except _NOT_FOUND as exc:
            raise BlobNotFound(f"object {path} not found") from exc
        except (BlobError, GeneratorExit):
            raise
        except Exception as exc:
            if "obstore" in type(exc).__module__:
                raise BlobError(f"cannot read {path}: {exc}") from exc
            raise

    async def get_range(self, path: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        try:
            return bytes(await obstore.get_range_async(self._store, path, start=start, end=end))
        except _NOT_FOUND as exc:
            raise BlobNotFound(f"object {path} not found") from exc
        except Exception as exc:
            raise BlobError(f"cannot read {path}: {exc}") from exc

    async def size(self, path: str) -> int:
        try:
            meta = await obstore.head_async(self._store, path)
            return int(meta["size"])
        except _NOT_FOUND as exc:
            raise BlobNotFound(f"object {path} not found") from exc
        except Exception as exc:
            raise BlobError(f"cannot stat {path}: {exc}") from exc

    async def exists(self, path: str) -> bool:
        try:
            await obstore.head_async(self._store, path)
            return True
        except _NOT_FOUND:
            return False
        except Exception as exc:
            raise BlobError(f"cannot stat {path}: {exc}") from exc

    async def delete(self, path: str) -> None:
        try:
            await obstore.delete_async(self._store, path)
        except _NOT_FOUND:
            pass
        except Exception as exc:
            raise BlobError(f"cannot delete {path}: {exc}") from exc

    async def delete_prefix(self, prefix: str) -> None:
        try:
            paths: list[str] = []
            async for batch in obstore.list(self._store, prefix=prefix.rstrip("/") + "/"):
                paths.extend(m["path"] for m in batch)
            for p in paths:
                await self.delete(p)
        except BlobError:
            raise
        except Exception as exc:
            raise BlobError(f"cannot delete under {prefix}: {exc}") from exc


def open_blobs(url: str | None, data_dir: Path) -> ObjectBlobs:
    """Blobs for `url`: `memory://`, `file:///abs/path`, `s3://bucket/prefix`, ...
    None means a local folder `blobs/` inside the data dir."""
    if url is None or url == "":
        folder = data_dir / "blobs"
        folder.mkdir(parents=True, exist_ok=True)
        return ObjectBlobs(LocalStore(folder, mkdir=True), f"local:{folder}")
    if url.startswith("memory://"):
        return ObjectBlobs(MemoryStore(), "memory")
    if url.startswith("file://") or "://" not in url:
        folder = Path(url.removeprefix("file://"))
        folder.mkdir(parents=True, exist_ok=True)
        return ObjectBlobs(LocalStore(folder, mkdir=True), f"local:{folder}")
    kwargs: dict[str, Any] = {}
    if url.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            kwargs["endpoint"] = endpoint
            if endpoint.startswith("http://"):
                kwargs["client_options"] = {"allow_http": True}
    return ObjectBlobs(from_url(url, **kwargs), url)
