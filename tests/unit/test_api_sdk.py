"""The official openai SDK against the app in-process: the drop-in promise, end to end over HTTP
(minus the socket). The SDK's own parsing and error classes are the judge of the wire format."""

from __future__ import annotations

from pathlib import Path

import httpx2 as httpx
import openai
import pytest
from test_api_support import KEY, api_harness

from backfill.domain.statuses import BatchStatus

pytestmark = pytest.mark.anyio

LINES = (
    b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", '
    b'"body": {"model": "llama", "messages": [{"role": "user", "content": "hi"}]}}\n'
)


async def test_sdk_files_and_batches(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as api:
        transport = httpx.ASGITransport(app=api.app)
        async with httpx.AsyncClient(transport=transport) as http:
            client = openai.AsyncOpenAI(
                base_url="http://testserver/v1", api_key=KEY, http_client=http, max_retries=0
            )
            f = await client.files.create(file=("in.jsonl", LINES), purpose="batch")
            assert f.status == "processed" and f.bytes == len(LINES)
            f = await client.files.wait_for_processing(f.id)
            assert (await client.files.retrieve(f.id)).filename == "in.jsonl"
            assert (await client.files.content(f.id)).content == LINES
            page = await client.files.list(purpose="batch")
            assert [x.id for x in page.data] == [f.id]

            b = await client.batches.create(
                input_file_id=f.id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
                metadata={"run": "1"},
            )
            assert b.status == "validating" and b.metadata == {"run": "1"}
            assert b.request_counts is not None and b.request_counts.total == 0
            assert (await client.batches.retrieve(b.id)).id == b.id
            batches = [x.id async for x in client.batches.list(limit=1)]
            assert batches == [b.id]

            cancelled = await client.batches.cancel(b.id)
            assert cancelled.status == "cancelling"
            api.store.transition(b.id, [BatchStatus.CANCELLING], BatchStatus.CANCELLED)
            # Deleting the input is allowed once the batch is finished.
            deleted = await client.files.delete(f.id)
            assert deleted.deleted is True

            with pytest.raises(openai.NotFoundError) as nf:
                await client.batches.retrieve("batch_missing")
            assert nf.value.code == "not_found" and nf.value.param == "batch_id"
            with pytest.raises(openai.BadRequestError) as bad:
                await client.batches.create(
                    input_file_id=f.id, endpoint="/v1/responses", completion_window="24h"
                )
            assert bad.value.param == "endpoint"

            done = await client.batches.create(
                input_file_id=(await client.files.create(file=LINES, purpose="batch")).id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
            )
            api.store.transition(done.id, [BatchStatus.VALIDATING], BatchStatus.FAILED)
            with pytest.raises(openai.ConflictError) as conflict:
                await client.batches.cancel(done.id)
            assert conflict.value.response.headers["x-should-retry"] == "false"

            stranger = openai.AsyncOpenAI(
                base_url="http://testserver/v1", api_key="sk-nope", http_client=http
            )
            with pytest.raises(openai.AuthenticationError):
                await stranger.files.list()
