"""A batch through backfill to real vLLM: every custom_id exactly once, in input order, and each
line's answer what vLLM itself answers for that body (usage equal token for token)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx2 as httpx
import pytest
from openai import OpenAI
from polling import poll
from sdk_helpers import COMPLETIONS, TERMINAL, chat_line, jsonl, upload
from vllm_tier import KEY, MODEL, backfill_for

from backfill.testing.server import BackfillProcess
from backfill.testing.vllm import VllmProcess

N = 40


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, vllm: VllmProcess
) -> Iterator[BackfillProcess]:
    proc = backfill_for(tmp_path_factory.mktemp("batch"), vllm, model_options="priority = true")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def lines() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(N):
        # ignore_eos (a vLLM sampling extension) fixes the answer's length: a random model's
        # end-of-sequence token would otherwise come at a point that depends on batch numerics
        body = {"max_tokens": 3 + i % 7, "temperature": 0, "ignore_eos": True}
        if i % 4 == 3:
            out.append(
                {
                    "custom_id": f"req-{i}",
                    "method": "POST",
                    "url": COMPLETIONS,
                    "body": {"model": MODEL, "prompt": f"one two three {i}", **body},
                }
            )
        else:
            content = " ".join(["hello world the quick brown fox"] * (1 + i % 5))
            out.append(chat_line(f"req-{i}", content, model=MODEL, **body))
    return out


def test_batch_exact_ids_and_vllm_usage(server: BackfillProcess, vllm: VllmProcess) -> None:
    client = OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=30)
    inputs = lines()
    # the same endpoint for every line is what OpenAI requires: two batches, one per endpoint
    by_url: dict[str, list[dict[str, Any]]] = {}
    for line in inputs:
        by_url.setdefault(line["url"], []).append(line)
    results: dict[str, dict[str, Any]] = {}
    for url, group in by_url.items():
        file = upload(client, jsonl(group))
        batch = client.batches.create(
            input_file_id=file.id,
            endpoint=url,  # type: ignore[arg-type]
            completion_window="24h",
        )
        done = poll(
            lambda b=batch: client.batches.retrieve(b.id),
            lambda b: b.status in TERMINAL,
            what=f"batch {batch.id} on vLLM to end",
            timeout=180,
        )
        assert done.status == "completed", done
        assert done.request_counts is not None
        assert (done.request_counts.completed, done.request_counts.failed) == (len(group), 0)
        assert done.output_file_id is not None and done.error_file_id is None
        out_lines = client.files.content(done.output_file_id).text.splitlines()
        ids = [json.loads(raw)["custom_id"] for raw in out_lines]
        assert ids == [line["custom_id"] for line in group]  # exactly once, in input order
        for raw in out_lines:
            row = json.loads(raw)
            results[row["custom_id"]] = row

    # what vLLM answers for the very same bodies, asked directly
    with httpx.Client(base_url=vllm.url, timeout=30) as direct:
        for line in inputs:
            row = results[line["custom_id"]]
            assert row["error"] is None
            assert row["response"]["status_code"] == 200
            body = row["response"]["body"]
            assert body["model"] == MODEL
            assert body["system_fingerprint"].startswith("vllm-")  # vLLM's answer, untouched
            expected = direct.post(line["url"].removeprefix("/v1"), json=line["body"]).json()
            assert body["usage"]["prompt_tokens"] == expected["usage"]["prompt_tokens"]
            assert body["usage"]["completion_tokens"] == line["body"]["max_tokens"]
            assert body["usage"] == expected["usage"]
            assert body["object"] == expected["object"]
            assert body["choices"][0]["finish_reason"] == "length"


def test_batch_usage_is_the_sum_of_vllm_usage(server: BackfillProcess) -> None:
    client = OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=30)
    group = [line for line in lines() if line["url"] != COMPLETIONS]
    file = upload(client, jsonl(group))
    batch = client.batches.create(
        input_file_id=file.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    done = poll(
        lambda: client.batches.retrieve(batch.id),
        lambda b: b.status in TERMINAL,
        what="the usage batch to end",
        timeout=180,
    )
    assert done.status == "completed" and done.output_file_id is not None
    rows = [json.loads(r) for r in client.files.content(done.output_file_id).text.splitlines()]
    prompt = sum(r["response"]["body"]["usage"]["prompt_tokens"] for r in rows)
    completion = sum(r["response"]["body"]["usage"]["completion_tokens"] for r in rows)
    assert completion == sum(line["body"]["max_tokens"] for line in group)
    assert done.usage is not None
    assert (done.usage.input_tokens, done.usage.output_tokens) == (prompt, completion)
    assert done.usage.total_tokens == prompt + completion


def test_model_is_listed(server: BackfillProcess) -> None:
    client = OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=30)
    assert [m.id for m in client.models.list()] == [MODEL]
