"""`Blobs` over obstore: memory (tests), a local folder (default) or S3/GCS/Azure by URL.

obstore streams in both directions without holding whole objects in memory; an upload of an
async iterator becomes a multipart upload, which is aborted if the iterator raises, so a
failed or oversize upload leaves nothing behind (we delete defensively too).

A killed process aborts nothing: in a local folder obstore writes every object to a staging
file `<path>#<n>` first (5 MiB per part as an upload streams in) and renames it into place when
complete, so a kill leaves the staging file. `list_staging` walks the folder for those (obstore's
own listing skips them) and leaves out the ones this process is streaming into right now.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterable, AsyncIterator, Collection, Iterator
from pathlib import Path
from typing import Any

import obstore
from obstore.exceptions import NotFoundError
from obstore.store import LocalStore, MemoryStore, from_url

from backfill.blobs.base import BlobInfo
from backfill.errors import BackfillError, BlobError, BlobNotFound

#: how obstore says an object is missing (the builtin for local folders and memory)
_NOT_FOUND = (NotFoundError, FileNotFoundError)
#: the name obstore gives a local object's staging file: `<path>#<n>`
_STAGING = re.compile(r"#[0-9]+$")


@contextlib.contextmanager
def _translated(
    doing: str, path: str, *, objects: bool = True, theirs: Collection[BaseException] = ()
) -> Iterator[None]:
    """The seam: what obstore (or the OS under a local folder) raises, as the tree's errors.

    A missing object (`_NOT_FOUND`) is `BlobNotFound` when `objects`, the call being about one
    object; for a write or a listing it means the store itself is missing (an S3 bucket
    answers 404), which is `BlobError` like any other failure. Our own errors pass as they
    are, and so does whatever a caller's iterator raised (`theirs`): a client that went away
    mid-upload is not a storage failure."""
    try:
        yield
    except BackfillError:
        raise
    except Exception as exc:
        if any(exc is e for e in theirs):
            raise
        if objects and isinstance(exc, _NOT_FOUND):
            raise BlobNotFound(f"object {path} not found") from exc
        raise BlobError(f"cannot {doing} {path}: {exc}") from exc


class ObjectBlobs:
    def __init__(self, store: Any, description: str, *, local_root: Path | None = None) -> None:
        self._store = store
        self.description = description
        #: the folder of a local store (where staging files live); None for other stores
        self._local_root = local_root
        #: paths `put_stream` is writing right now (their staging files are no debris)
        self._writing: set[str] = set()

    def __repr__(self) -> str:
        return f"ObjectBlobs({self.description})"

    async def put(self, path: str, data: bytes) -> None:
        with _translated("write", path, objects=False):
            await obstore.put_async(self._store, path, data)

    async def put_stream(self, path: str, chunks: AsyncIterable[bytes]) -> int:
        size = 0
        theirs: list[BaseException] = []  # raised by `chunks`: the caller's, not the store's

        async def counted() -> AsyncIterator[bytes]:
            nonlocal size
            iterator = aiter(chunks)
            while True:
                try:
                    chunk = await anext(iterator)
                except StopAsyncIteration:
                    return
                except BaseException as exc:
                    theirs.append(exc)
                    raise
                size += len(chunk)
                yield chunk

        self._writing.add(path)
        try:
            with _translated("write", path, objects=False, theirs=theirs):
                await obstore.put_async(
                    self._store, path, counted(), chunk_size=5 << 20, max_concurrency=2
                )
        except BaseException:
            with contextlib.suppress(Exception):
                await obstore.delete_async(self._store, path)
            raise
        finally:
            self._writing.discard(path)
        return size

    async def get(self, path: str) -> bytes:
        with _translated("read", path):
            result = await obstore.get_async(self._store, path)
            return bytes(await result.bytes_async())

    async def stream(
        self, path: str, start: int = 0, end: int | None = None, chunk_size: int = 1 << 20
    ) -> AsyncIterator[bytes]:
        if end is not None and end <= start:
            return
        options: dict[str, Any] = {}
        if start or end is not None:
            options["range"] = (start, end) if end is not None else {"offset": start}
        with _translated("read", path):
            result = await obstore.get_async(self._store, path, options=options or None)  # type: ignore[arg-type]
            first, last = result.range
            if last - first <= chunk_size:  # one piece: a third of the cost of a stream
                data = bytes(await result.bytes_async())
                if data:
                    yield data
                return
            async for chunk in result.stream(min_chunk_size=chunk_size):
                if len(chunk) <= chunk_size:
                    yield bytes(chunk)
                    continue
                # some stores answer in one piece (memory): hand it on in `chunk_size` pieces
                # so a reader never holds more than one as Python bytes
                view = memoryview(chunk)
                for at in range(0, len(view), chunk_size):
                    yield bytes(view[at : at + chunk_size])

    async def get_range(self, path: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        with _translated("read", path):
            return bytes(await obstore.get_range_async(self._store, path, start=start, end=end))

    async def size(self, path: str) -> int:
        with _translated("stat", path):
            meta = await obstore.head_async(self._store, path)
            return int(meta["size"])

    async def exists(self, path: str) -> bool:
        try:
            await self.size(path)
        except BlobNotFound:
            return False
        return True

    async def delete(self, path: str) -> None:
        with contextlib.suppress(BlobNotFound), _translated("delete", path):
            await obstore.delete_async(self._store, path)

    async def delete_prefix(self, prefix: str) -> None:
        paths: list[str] = []
        with _translated("delete under", prefix, objects=False):
            async for batch in obstore.list(self._store, prefix=prefix.rstrip("/") + "/"):
                paths.extend(m["path"] for m in batch)
        for p in paths:
            await self.delete(p)

    # -- listing (for the debris collector) -----------------------------------------------------
    async def list_prefix(self, prefix: str) -> AsyncIterator[BlobInfo]:
        where = prefix.strip("/")
        with _translated("list", prefix, objects=False):
            async for batch in obstore.list(self._store, prefix=where + "/" if where else None):
                for meta in batch:
                    modified = meta["last_modified"].timestamp()
                    yield BlobInfo(meta["path"], int(meta["size"]), modified)

    async def list_staging(self) -> AsyncIterator[BlobInfo]:
        root = self._local_root
        if root is None:
            return
        with _translated("list", "staging files", objects=False):
            found = await asyncio.to_thread(_staging_files, root)
        for info in found:
            if _STAGING.sub("", info.path) not in self._writing:
                yield info

    async def delete_staging(self, path: str) -> None:
        root = self._local_root
        if root is None or not _STAGING.search(path) or ".." in path.split("/"):
            raise ValueError(f"not a staging file: {path!r}")
        with contextlib.suppress(BlobNotFound), _translated("delete", path):
            await asyncio.to_thread(os.unlink, root / path)


def _staging_files(root: Path) -> list[BlobInfo]:
    found: list[BlobInfo] = []
    for folder, _, names in os.walk(root):
        for name in names:
            if not _STAGING.search(name):
                continue
            full = os.path.join(folder, name)
            try:
                st = os.stat(full)
            except FileNotFoundError:
                continue  # completed (renamed) or removed meanwhile
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            found.append(BlobInfo(rel, st.st_size, st.st_mtime))
    return found


def open_blobs(url: str | None, data_dir: Path) -> ObjectBlobs:
    """Blobs for `url`: `memory://`, `file:///abs/path`, `s3://bucket/prefix`, ...
    None means a local folder `blobs/` inside the data dir."""
    if url is None or url == "":
        folder = data_dir / "blobs"
        folder.mkdir(parents=True, exist_ok=True)
        return ObjectBlobs(
            LocalStore(folder, mkdir=True), f"local:{folder}", local_root=folder.resolve()
        )
    if url.startswith("memory://"):
        return ObjectBlobs(MemoryStore(), "memory")
    if url.startswith("file://") or "://" not in url:
        folder = Path(url.removeprefix("file://"))
        folder.mkdir(parents=True, exist_ok=True)
        return ObjectBlobs(
            LocalStore(folder, mkdir=True), f"local:{folder}", local_root=folder.resolve()
        )
    kwargs: dict[str, Any] = {}
    if url.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            kwargs["endpoint"] = endpoint
            if endpoint.startswith("http://"):
                kwargs["client_options"] = {"allow_http": True}
    return ObjectBlobs(from_url(url, **kwargs), url)
