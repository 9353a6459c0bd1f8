"""The blob contract of `test_blobs.py` on S3: `open_blobs("s3://bucket/prefix")` against a
moto server on loopback (a real HTTP S3 API, path-style, plain http).

The tests are the same functions, imported: only the `blobs` fixture differs. Each test gets a
fresh bucket, so no test sees another's objects. The AWS variables are set with `monkeypatch`
for the test only: `open_blobs` reads `AWS_ENDPOINT_URL` and the credentials from the
environment, exactly as a deployment does.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

# the contract itself, collected again here with the S3 `blobs` fixture below
from test_blobs import (  # noqa: F401
    test_delete_prefix,
    test_get_range,
    test_missing_objects,
    test_put_get_overwrite,
    test_put_stream,
    test_put_stream_that_raises_keeps_no_partial_overwrite,
    test_put_stream_that_raises_leaves_nothing,
    test_size_exists_delete,
    test_stream_ranges,
)

from backfill.blobs import ObjectBlobs, open_blobs

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def blobs(s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ObjectBlobs:
    for name, value in {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    bucket = f"bf-{secrets.token_hex(6)}"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    return open_blobs(f"s3://{bucket}/some/prefix", tmp_path)


def test_objects_live_under_the_prefix(blobs: ObjectBlobs, s3_endpoint: str) -> None:
    """What the S3 API itself shows: keys are `prefix/path`, nothing outside the prefix."""
    import asyncio

    asyncio.run(blobs.put("files/f1", b"abc"))
    bucket = blobs.description.removeprefix("s3://").split("/", 1)[0]
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert keys == ["some/prefix/files/f1"]
    assert s3.get_object(Bucket=bucket, Key=keys[0])["Body"].read() == b"abc"
