"""Files API in-process: streamed upload, list, retrieve, content with ranges, delete."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_api_support import T0, api_harness, assert_error, blob_paths

pytestmark = pytest.mark.anyio

LINES = b"".join(b'{"custom_id": "r%d", "n": %d}\n' % (i, i) for i in range(50))


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "bf-BOUNDARY") -> bytes:
    out = b""
    for name, filename, value in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if filename is not None:
            out += b"Content-Type: application/octet-stream\r\n"
        out += b"\r\n" + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def chunked(data: bytes, size: int) -> AsyncIterator[bytes]:
    async def gen() -> AsyncIterator[bytes]:
        for i in range(0, len(data), size):
            yield data[i : i + size]

    return gen()


MP_HEADERS = {"content-type": "multipart/form-data; boundary=bf-BOUNDARY"}


async def test_upload_returns_file_object_and_stores_bytes(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as api:
        r = await api.upload(LINES, filename="requests.jsonl")
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/json"
        assert r.headers["x-request-id"].startswith("req_")
        body = r.json()
        assert body == {
            "id": body["id"],
            "object": "file",
            "bytes": len(LINES),
            "created_at": T0,
            "expires_at": T0 + 30 * 86400,  # batch files expire after 30 days by default
            "filename": "requests.jsonl",
            "purpose": "batch",
            "status": "processed",
            "status_details": None,
        }
        assert body["id"].startswith("file-")
        record = api.store.get_file(body["id"], api.project.id)
        assert record is not None and record.bytes == len(LINES)
        assert await api.blobs.get(record.blob_path) == LINES


async def test_purpose_after_file_and_odd_chunking(tmp_path: Path) -> None:
    content = bytes(range(256)) * 4000 + b"\r\n--bf-BOUNDAR"  # binary, boundary-like tail
    raw = multipart([("file", "C:\\Users\\me\\data.bin", content), ("purpose", None, b"user_data")])
    async with api_harness(tmp_path) as api:
        for size in (1, 7, 4093, 1 << 16):
            body = (
                raw if size != 1 else multipart([("purpose", None, b"batch"), ("file", "a", b"xy")])
            )
            r = await api.client.post(
                "/v1/files",
                headers={**api.headers, **MP_HEADERS},
                content=chunked(body, size),
            )
            assert r.status_code == 200, r.text
            info = r.json()
            record = api.store.get_file(info["id"])
            assert record is not None
            if size == 1:
                assert (info["filename"], info["purpose"], info["bytes"]) == ("a", "batch", 2)
                continue
            assert info["filename"] == "data.bin"
            assert info["purpose"] == "user_data"
            assert await api.blobs.get(record.blob_path) == content


async def test_empty_file_is_accepted(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as api:
        r = await api.upload(b"")
        assert r.status_code == 200, r.text
        assert r.json()["bytes"] == 0
        c = await api.client.get(f"/v1/files/{r.json()['id']}/content", headers=api.headers)
        assert c.status_code == 200 and c.content == b""
        assert c.headers["content-length"] == "0"


@pytest.mark.parametrize(
    ("purpose", "param", "code"),
    [
        (None, "purpose", "missing_required_parameter"),
        ("", "purpose", "missing_required_parameter"),
        ("nonsense", "purpose", "invalid_value"),
        ("batch_output", "purpose", "invalid_value"),
    ],
)
async def test_bad_purpose_is_400_and_nothing_stored(
    tmp_path: Path, purpose: str | None, param: str, code: str
) -> None:
    async with api_harness(tmp_path) as api:
        r = await api.upload(LINES, purpose=purpose)
        assert_error(r, 400, param=param, code=code, type_="invalid_request_error")
        assert api.store.list_files(api.project.id).items == []
        assert await blob_paths(api.blobs) == []


async def test_bad_purpose_after_the_file_removes_the_blob(tmp_path: Path) -> None:
    raw = multipart([("file", "x.jsonl", LINES), ("purpose", None, b"wat")])
    async with api_harness(tmp_path) as api:
        r = await api.client.post("/v1/files", headers={**api.headers, **MP_HEADERS}, content=raw)
        assert_error(r, 400, param="purpose")
        assert api.store.list_files(api.project.id).items == []
        assert await blob_paths(api.blobs) == []


async def test_missing_file_part(tmp_path: Path) -> None:
    raw = multipart([("purpose", None, b"batch")])
    async with api_harness(tmp_path) as api:
        r = await api.client.post("/v1/files", headers={**api.headers, **MP_HEADERS}, content=raw)
        assert_error(r, 400, param="file", code="missing_required_parameter")


async def test_not_multipart(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as api:
        r = await api.client.post("/v1/files", headers=api.headers, json={"purpose": "batch"})
        assert_error(r, 400, param="file")


async def test_truncated_multipart_body(tmp_path: Path) -> None:
    raw = multipart([("purpose", None, b"batch"), ("file", "x.jsonl", LINES)])[:-40]
    async with api_harness(tmp_path) as api:
        r = await api.client.post("/v1/files", headers={**api.headers, **MP_HEADERS}, content=raw)
        assert_error(r, 400)
        assert await blob_paths(api.blobs) == []
        assert api.store.list_files(api.project.id).items == []


async def test_two_file_parts_rejected(tmp_path: Path) -> None:
    raw = multipart([("purpose", None, b"batch"), ("file", "a", b"1"), ("file", "b", b"2")])
    async with api_harness(tmp_path) as api:
        r = await api.client.post("/v1/files", headers={**api.headers, **MP_HEADERS}, content=raw)
        assert_error(r, 400, param="file")
        assert await blob_paths(api.blobs) == []


async def test_over_limit_while_streaming_is_413_and_nothing_stored(tmp_path: Path) -> None:
    async with api_harness(tmp_path, max_upload_bytes=10_000) as api:
        big = b"x" * 10_001
        # Purpose after the file and a chunked body (no Content-Length): only streaming sees it.
        raw = multipart([("file", "big.jsonl", big), ("purpose", None, b"batch")])
        r = await api.client.post(
            "/v1/files", headers={**api.headers, **MP_HEADERS}, content=chunked(raw, 3000)
        )
        err = assert_error(r, 413, param="file", code="file_too_large")
        assert "10000 bytes" in err["message"]
        assert r.headers["x-should-retry"] == "false"
        # Exactly at the limit is fine.
        ok = await api.upload(b"x" * 10_000)
        assert ok.status_code == 200, ok.text
        assert [f.id for f in api.store.list_files(api.project.id).items] == [ok.json()["id"]]
        assert await blob_paths(api.blobs) == [f"files/{ok.json()['id']}"]


async def test_far_over_limit_rejected_from_content_length(tmp_path: Path) -> None:
    async with api_harness(tmp_path, max_upload_bytes=1000) as api:
        r = await api.upload(b"y" * (3 << 20))
        err = assert_error(r, 413, code="file_too_large")
        assert "the limit is 1000 bytes" in err["message"]
        assert str(int(r.request.headers["content-length"])) in err["message"]
        assert api.store.list_files(api.project.id).items == []
        assert await blob_paths(api.blobs) == []


async def test_expires_after(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as api:
        extra = {"expires_after[anchor]": "created_at", "expires_after[seconds]": "7200"}
        r = await api.upload(LINES, extra=extra)
        assert r.status_code == 200, r.text
        assert r.json()["expires_at"] == T0 + 7200
        for seconds in ("10", "99999999", "soon"):
            bad = {"expires_after[anchor]": "created_at", "expires_after[seconds]": seconds}
            assert_error(await api.upload(LINES, extra=bad), 400, param="expires_after[seconds]")
        bad = {"expires_after[anchor]": "last_used", "expires_after[seconds]": "7200"}
        assert_error(await api.upload(LINES, extra=bad), 400, param="expires_after[anchor]")
        assert len(api.store.list_files(api.project.id).items) == 1
        assert len(await blob_paths(api.blobs)) == 1


async def test_list_files_order_limit_after_purpose(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as api:
        empty = await api.client.get("/v1/files", headers=api.headers)
        assert empty.json() == {
            "object": "list",
            "data": [],
            "first_id": None,
            "last_id": None,
            "has_more": False,
        }
        ids = []
        for i in range(4):
            api.clock.now = T0 + i
            ids.append(await api.file_id(purpose="batch" if i % 2 == 0 else "user_data"))
        await api.file_id(headers=api.other_headers)  # another project's: never listed

        r = await api.client.get("/v1/files", headers=api.headers)
        body = r.json()
        assert [f["id"] for f in body["data"]] == ids[::-1]
        assert (body["first_id"], body["last_id"], body["has_more"]) == (ids[3], ids[0], False)

        r = await api.client.get("/v1/files?order=asc&limit=2", headers=api.headers)
        body = r.json()
        assert [f["id"] for f in body["data"]] == ids[:2] and body["has_more"] is True
        r = await api.client.get(
            f"/v1/files?order=asc&limit=2&after={body['last_id']}", headers=api.headers
        )
        assert [f["id"] for f in r.json()["data"]] == ids[2:]
        assert r.json()["has_more"] is False

        r = await api.client.get("/v1/files?purpose=user_data", headers=api.headers)
        assert [f["id"] for f in r.json()["data"]] == [ids[3], ids[1]]

        for bad in ("limit=0", "limit=10001", "limit=x", "order=sideways"):
            r = await api.client.get(f"/v1/files?{bad}", headers=api.headers)
            assert_error(r, 400, param=bad.split("=")[0], type_="invalid_request_error")


async def test_retrieve_and_cross_project_404(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as api:
        fid = await api.file_id()
        r = await api.client.get(f"/v1/files/{fid}", headers=api.headers)
        assert r.status_code == 200 and r.json()["id"] == fid
        for method, path in [
            ("GET", f"/v1/files/{fid}"),
            ("GET", f"/v1/files/{fid}/content"),
            ("DELETE", f"/v1/files/{fid}"),
        ]:
            theirs = await api.client.request(method, path, headers=api.other_headers)
            unknown = await api.client.request(
                method, path.replace(fid, "file-doesnotexist"), headers=api.other_headers
            )
            err = assert_error(theirs, 404, param="file_id", type_="invalid_request_error")
            assert err["message"] == f"No such File object: {fid}"
            assert assert_error(unknown, 404)["code"] == err["code"]
        assert api.store.get_file(fid) is not None  # the cross-project delete did nothing


async def test_content_full_and_ranges(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as api:
        fid = await api.file_id(LINES)
        url = f"/v1/files/{fid}/content"
        size = len(LINES)
        r = await api.client.get(url, headers=api.headers)
        assert r.status_code == 200 and r.content == LINES
        assert r.headers["content-length"] == str(size)
        assert r.headers["accept-ranges"] == "bytes"
        assert r.headers["content-type"] == "application/octet-stream"
        assert r.headers["x-request-id"]

        cases = {
            "bytes=0-9": (0, 10),
            "bytes=10-": (10, size),
            "bytes=-5": (size - 5, size),
            f"bytes=5-{size + 100}": (5, size),
            "bytes=-99999": (0, size),
        }
        for header, (start, end) in cases.items():
            r = await api.client.get(url, headers={**api.headers, "range": header})
            assert r.status_code == 206, header
            assert r.content == LINES[start:end], header
            assert r.headers["content-range"] == f"bytes {start}-{end - 1}/{size}"
            assert r.headers["content-length"] == str(end - start)

        for header in (f"bytes={size}-", "bytes=-0", f"bytes={size + 5}-{size + 9}"):
            r = await api.client.get(url, headers={**api.headers, "range": header})
            assert_error(r, 416, code="range_not_satisfiable")
            assert r.headers["content-range"] == f"bytes */{size}"

        # Ranges we do not serve are ignored: the whole file with 200.
        for header in ("bytes=0-1,5-6", "items=0-3", "bytes=9-3", "bytes=abc"):
            r = await api.client.get(url, headers={**api.headers, "range": header})
            assert r.status_code == 200 and r.content == LINES, header


async def test_big_upload_roundtrip(tmp_path: Path) -> None:
    content = b"".join(
        b'{"custom_id": "%08d", "pad": "%s"}\n' % (i, b"z" * 90) for i in range(40_000)
    )
    async with api_harness(tmp_path) as api:
        fid = await api.file_id(content)
        r = await api.client.get(f"/v1/files/{fid}/content", headers=api.headers)
        assert r.content == content
        r = await api.client.get(
            f"/v1/files/{fid}/content", headers={**api.headers, "range": "bytes=1048570-1048600"}
        )
        assert r.content == content[1048570:1048601]


async def test_delete(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as api:
        fid = await api.file_id()
        r = await api.client.delete(f"/v1/files/{fid}", headers=api.headers)
        assert r.status_code == 200
        assert r.json() == {"id": fid, "object": "file", "deleted": True}
        assert await blob_paths(api.blobs) == []
        assert_error(await api.client.get(f"/v1/files/{fid}", headers=api.headers), 404)
        assert_error(await api.client.delete(f"/v1/files/{fid}", headers=api.headers), 404)


async def test_delete_refused_while_a_batch_uses_the_file(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as api:
        fid = await api.file_id()
        await api.batch_id(input_file_id=fid)
        r = await api.client.delete(f"/v1/files/{fid}", headers=api.headers)
        assert_error(r, 409, code="file_in_use")
        assert r.headers["x-should-retry"] == "false"
        assert api.store.get_file(fid) is not None
        assert await blob_paths(api.blobs) == [f"files/{fid}"]


async def test_content_of_a_file_whose_blob_vanished(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as api:
        fid = await api.file_id(LINES)
        await api.blobs.delete(f"files/{fid}")
        r = await api.client.get(f"/v1/files/{fid}/content", headers=api.headers)
        err = assert_error(r, 404, param="file_id")
        assert "files/" not in err["message"]
