"""The blob contract on every local backend: memory and a local folder.

There is no pytest-asyncio: each test is a sync function that runs its coroutine with
`asyncio.run`, so every test gets a fresh event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from backfill.blobs import ObjectBlobs, open_blobs
from backfill.errors import BlobNotFound

DATA = bytes(range(256)) * 40  # 10 KiB, every byte value


@pytest.fixture(params=["memory", "local"])
def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectBlobs:
    if request.param == "memory":
        return open_blobs("memory://", tmp_path)
    return open_blobs(None, tmp_path)


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(test())


async def collect(chunks: AsyncIterator[bytes]) -> list[bytes]:
    return [c async for c in chunks]


def test_put_get_overwrite(blobs: ObjectBlobs) -> None:
    async def body() -> None:
        await blobs.put("files/a", DATA)
        assert await blobs.get("files/a") == DATA
        await blobs.put("files/a", b"new")
        assert await blobs.get("files/a") == b"new"
        await blobs.put("files/empty", b"")
        assert await blobs.get("files/empty") == b""

    run(body)


def test_missing_objects(blobs: ObjectBlobs) -> None:
    async def body() -> None:
        assert not await blobs.exists("nope")
        with pytest.raises(BlobNotFound):
            await blobs.get("nope")
        with pytest.raises(BlobNotFound):
            await blobs.size("nope")
        with pytest.raises(BlobNotFound):
            await blobs.get_range("nope", 0, 10)
        with pytest.raises(BlobNotFound):
            await collect(blobs.stream("nope"))
        await blobs.delete("nope")  # fine

    run(body)


def test_size_exists_delete(blobs: ObjectBlobs) -> None:
    async def body() -> None:
        await blobs.put("x/y", DATA)
        assert await blobs.exists("x/y")
        assert await blobs.size("x/y") == len(DATA)
        await blobs.delete("x/y")
        assert not await blobs.exists("x/y")

    run(body)


def test_get_range(blobs: ObjectBlobs) -> None:
    async def body() -> None:
        await blobs.put("r", DATA)
        assert await blobs.get_range("r", 0, 10) == DATA[:10]
        assert await blobs.get_range("r", 300, 700) == DATA[300:700]
        assert await blobs.get_range("r", len(DATA) - 5, len(DATA)) == DATA[-5:]
        assert await blobs.get_range("r", 7, 7) == b""

    run(body)


@pytest.mark.parametrize(
    ("start", "end"),
    [(0, None), (0, len(DATA)), (1, None), (100, 5000), (len(DATA) - 1, None), (50, 50), (9, 3)],
)
def test_stream_ranges(blobs: ObjectBlobs, start: int, end: int | None) -> None:
    async def body() -> None:
        await blobs.put("s", DATA)
        chunks = await collect(blobs.stream("s", start, end, chunk_size=1000))
        expected = DATA[start:end] if end is None or end > start else b""
        assert b"".join(chunks) == expected
        assert all(chunks)  # no empty chunks

    run(body)


def test_delete_prefix(blobs: ObjectBlobs) -> None:
    async def body() -> None:
        for path in ("batches/b1/seg/0", "batches/b1/seg/1", "batches/b1/out", "batches/b10/x"):
            await blobs.put(path, b"z")
        await blobs.delete_prefix("batches/b1")
        assert not await blobs.exists("batches/b1/seg/0")
        assert not await blobs.exists("batches/b1/seg/1")
        assert not await blobs.exists("batches/b1/out")
        assert await blobs.exists("batches/b10/x")  # a sibling that merely shares the prefix
        await blobs.delete_prefix("batches/nothing-here")

    run(body)


def test_put_stream(blobs: ObjectBlobs) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(DATA), 999):
            yield DATA[i : i + 999]

    async def body() -> None:
        assert await blobs.put_stream("up/ok", chunks()) == len(DATA)
        assert await blobs.get("up/ok") == DATA

    run(body)


class Boom(Exception):
    pass


@pytest.mark.parametrize("before_failure", [0, 3 * 1024, 9 * 1024 * 1024])
def test_put_stream_that_raises_leaves_nothing(blobs: ObjectBlobs, before_failure: int) -> None:
    """Also past the 8 MiB multipart part size, where a part has already been uploaded."""

    async def failing() -> AsyncIterator[bytes]:
        sent = 0
        while sent < before_failure:
            piece = min(1 << 20, before_failure - sent)
            yield b"q" * piece
            sent += piece
        raise Boom("client went away")

    async def body() -> None:
        with pytest.raises(Boom):
            await blobs.put_stream("up/broken", failing())
        assert not await blobs.exists("up/broken")

    run(body)


def test_put_stream_that_raises_keeps_no_partial_overwrite(blobs: ObjectBlobs) -> None:
    """A failed upload over an existing path leaves nothing at that path (documented: "nothing
    is left"), never a truncated mix."""

    async def failing() -> AsyncIterator[bytes]:
        yield b"partial"
        raise Boom("client went away")

    async def body() -> None:
        await blobs.put("up/old", b"old")
        with pytest.raises(Boom):
            await blobs.put_stream("up/old", failing())
        if await blobs.exists("up/old"):
            assert await blobs.get("up/old") == b"old"

    run(body)
