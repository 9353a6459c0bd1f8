"""Listing, on every local blob backend (memory and a local folder): `list_prefix` for stored
objects, `list_staging` / `delete_staging` for the partial writes a crash leaves behind."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from test_blobs import blobs, run  # noqa: F401 (the `blobs` fixture)

from backfill.blobs import ObjectBlobs, open_blobs


def test_list_prefix(blobs: ObjectBlobs) -> None:  # noqa: F811
    async def body() -> None:
        before = time.time() - 5
        for path, data in [
            ("batches/b1/seg/0", b"a"),
            ("batches/b1/seg/1", b"bb"),
            ("batches/b10/seg/0", b"ccc"),
            ("files/file-x", b"dddd"),
        ]:
            await blobs.put(path, data)
        listed = sorted([info async for info in blobs.list_prefix("batches/b1")])
        assert [(i.path, i.size) for i in listed] == [
            ("batches/b1/seg/0", 1),
            ("batches/b1/seg/1", 2),
        ]
        assert all(before <= i.last_modified <= time.time() + 5 for i in listed)
        assert len([i async for i in blobs.list_prefix("batches/")]) == 3
        assert len([i async for i in blobs.list_prefix("")]) == 4
        assert [i async for i in blobs.list_prefix("nothing")] == []
        # staging files are not objects
        assert [i async for i in blobs.list_staging()] == []

    run(body)


def test_staging_files_of_a_local_folder(tmp_path: Path) -> None:
    local = open_blobs(None, tmp_path)
    folder = tmp_path / "blobs"
    (folder / "files").mkdir(parents=True)
    (folder / "files" / "file-a#1").write_bytes(b"x" * 10)
    (folder / "batches" / "b" / "seg").mkdir(parents=True)
    (folder / "batches" / "b" / "seg" / "00001#12").write_bytes(b"y")
    (folder / "files" / "file-b").write_bytes(b"a stored object")
    os.utime(folder / "files" / "file-a#1", (1000.0, 1000.0))

    async def body() -> None:
        found = sorted([i async for i in local.list_staging()])
        assert [(i.path, i.size) for i in found] == [
            ("batches/b/seg/00001#12", 1),
            ("files/file-a#1", 10),
        ]
        assert found[1].last_modified == 1000.0
        await local.delete_staging("files/file-a#1")
        await local.delete_staging("files/file-a#1")  # gone already: fine
        for not_staging in ("files/file-b", "../outside#1"):
            with pytest.raises(ValueError):
                await local.delete_staging(not_staging)
        assert [i.path async for i in local.list_staging()] == ["batches/b/seg/00001#12"]
        assert await local.get("files/file-b") == b"a stored object"

    asyncio.run(body())
