"""`backfill serve --storage s3://bucket/prefix` against a moto S3 server on loopback.

A small batch goes through the SDK; the input and the output land in the bucket under the
prefix (what the S3 API itself lists, read with boto3), the output object is byte for byte what
the SDK downloads, and the batch's segment objects are gone after finalization. The server
finds the endpoint and the credentials in the usual AWS variables.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from acceptance_settings import FAST_ENV
from openai import OpenAI
from polling import poll
from sdk_helpers import chat_line, read_jsonl, run_batch

from backfill.testing import UpstreamProcess
from backfill.testing.server import BackfillProcess

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

KEY = "sk-acceptance-s3"


@pytest.fixture
def s3_endpoint() -> Iterator[str]:
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def test_serve_on_s3_storage(
    tmp_path: Path, upstream: UpstreamProcess, servers: list[BackfillProcess], s3_endpoint: str
) -> None:
    bucket, prefix = f"bf-{secrets.token_hex(6)}", "team/backfill"
    s3: Any = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    s3.create_bucket(Bucket=bucket)
    aws = {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
    }
    proc = BackfillProcess(
        tmp_path,
        api_keys=[KEY],
        models=[f"m={upstream.url}"],
        extra_args=["--storage", f"s3://{bucket}/{prefix}"],
        env={**FAST_ENV, **aws},
    )
    servers.append(proc)
    proc.start()
    client = OpenAI(base_url=proc.base_url, api_key=KEY, max_retries=1, timeout=15.0)

    ids = [f"s{i}" for i in range(7)]  # 4 shards of 2
    done = run_batch(client, [chat_line(cid, f"to s3 {cid}") for cid in ids])
    assert done.status == "completed", done
    assert done.output_file_id is not None
    assert [o["custom_id"] for o in read_jsonl(client, done.output_file_id)] == ids

    def keys() -> set[str]:
        return {o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}

    # the segments are deleted just after the batch is reported completed: wait for that
    expected = {f"{prefix}/files/{done.input_file_id}", f"{prefix}/files/{done.output_file_id}"}
    assert keys() >= expected
    poll(keys, lambda k: k == expected, what="only the input and output to stay in the bucket")
    body = s3.get_object(Bucket=bucket, Key=f"{prefix}/files/{done.output_file_id}")["Body"]
    assert body.read() == client.files.content(done.output_file_id).content
    assert not (tmp_path / "blobs").exists()  # nothing went to the local folder
