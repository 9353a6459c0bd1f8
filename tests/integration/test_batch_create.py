"""Synchronous checks on create: completion windows, metadata limits, expiry fields."""

from __future__ import annotations

from typing import Any

import pytest
from openai import BadRequestError, OpenAI
from sdk_helpers import CHAT, chat_line, jsonl, upload, wait_batch


@pytest.fixture(scope="module")
def input_id(client: OpenAI) -> str:
    return upload(client, jsonl([chat_line("w", "window")])).id


@pytest.mark.parametrize(
    ("window", "seconds"), [("24h", 86400), ("1h", 3600), ("90m", 5400), ("7d", 604800)]
)
def test_completion_windows_in_range(
    client: OpenAI, input_id: str, window: str, seconds: int
) -> None:
    batch = client.batches.create(
        input_file_id=input_id,
        endpoint=CHAT,
        completion_window=window,  # type: ignore[arg-type]
    )
    assert batch.completion_window == window
    assert batch.expires_at == batch.created_at + seconds
    wait_batch(client, batch.id)


@pytest.mark.parametrize("window", ["30m", "8d", "soon", "", "24"])
def test_completion_windows_out_of_range(client: OpenAI, input_id: str, window: str) -> None:
    before = [b.id for b in client.batches.list(limit=5)]
    with pytest.raises(BadRequestError) as info:
        client.batches.create(
            input_file_id=input_id,
            endpoint=CHAT,
            completion_window=window,  # type: ignore[arg-type]
        )
    assert info.value.response.json()["error"]["param"] == "completion_window"
    assert [b.id for b in client.batches.list(limit=5)] == before


@pytest.mark.parametrize(
    "metadata",
    [
        {f"k{i}": "v" for i in range(17)},
        {"k" * 65: "v"},
        {"k": "v" * 513},
    ],
    ids=["17-pairs", "long-key", "long-value"],
)
def test_metadata_limits(client: OpenAI, input_id: str, metadata: dict[str, Any]) -> None:
    with pytest.raises(BadRequestError) as info:
        client.batches.create(
            input_file_id=input_id, endpoint=CHAT, completion_window="24h", metadata=metadata
        )
    assert info.value.response.json()["error"]["param"] is not None


def test_output_expires_after(client: OpenAI, input_id: str) -> None:
    batch = client.batches.create(
        input_file_id=input_id,
        endpoint=CHAT,
        completion_window="24h",
        output_expires_after={"anchor": "created_at", "seconds": 7200},
    )
    done = wait_batch(client, batch.id)
    assert done.status == "completed"
    assert done.output_file_id is not None
    out = client.files.retrieve(done.output_file_id)
    assert out.expires_at == out.created_at + 7200


@pytest.mark.parametrize("seconds", [3599, 2592001])
def test_file_expiry_bounds(client: OpenAI, seconds: int) -> None:
    with pytest.raises(BadRequestError):
        client.files.create(
            file=("x.jsonl", b"{}\n"),
            purpose="batch",
            expires_after={"anchor": "created_at", "seconds": seconds},
        )
