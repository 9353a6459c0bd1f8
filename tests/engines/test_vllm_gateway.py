"""Real-time traffic through backfill's gateway to real vLLM: streaming with the usage chunk, and
a client that hangs up mid-stream aborting its request at vLLM (not left generating)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx2 as httpx
import pytest
from openai import OpenAI
from polling import poll
from vllm_tier import KEY, MAX_MODEL_LEN, MODEL, backfill_for

from backfill.testing.server import BackfillProcess
from backfill.testing.vllm import VllmProcess


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, vllm: VllmProcess
) -> Iterator[BackfillProcess]:
    proc = backfill_for(tmp_path_factory.mktemp("gateway"), vllm, model_options="priority = true")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def test_streaming_through_the_gateway_ends_with_vllm_usage(server: BackfillProcess) -> None:
    client = OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=60)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "tell me a story about a robot"}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) >= 2  # streamed token by token, not one answer at the end
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length"
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None  # the usage chunk, as vLLM sends it
    assert last.usage.completion_tokens == 12
    assert last.usage.prompt_tokens > 0
    assert {c.id for c in chunks} == {chunks[0].id}


def test_non_streaming_through_the_gateway(server: BackfillProcess) -> None:
    client = OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=60)
    answer = client.completions.create(
        model=MODEL, prompt="one two three", max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert answer.usage is not None and answer.usage.completion_tokens == 5
    assert answer.system_fingerprint is not None and answer.system_fingerprint.startswith("vllm")


def test_client_disconnect_aborts_the_request_at_vllm(
    server: BackfillProcess, vllm: VllmProcess
) -> None:
    # a stream that would run to the model's length limit: ~4000 tokens, 1 to 20 s here
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": MAX_MODEL_LEN - 32,
        "stream": True,
        "ignore_eos": True,
    }
    finished_before = vllm.gauge("vllm:request_success_total")
    generated_before = vllm.gauge("vllm:generation_tokens_total")
    with (
        httpx.Client(timeout=60) as http,
        http.stream(
            "POST",
            server.base_url + "/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {KEY}"},
        ) as response,
    ):
        assert response.status_code == 200
        seen = 0
        for line in response.iter_lines():
            if line.startswith("data: {"):
                json.loads(line.removeprefix("data: "))
                seen += 1
            if seen >= 3:
                break
    # the client hung up after three events: backfill must abort the request at vLLM, which
    # then stops generating for it long before its ~4000 tokens. (vLLM 0.32 counts no aborted
    # request in request_success_total, whatever its finished_reason label offers: what shows
    # an abort is a request that left the running set without finishing, and its few tokens.)
    poll(lambda: vllm.gauge("vllm:num_requests_running") == 0, what="vLLM to run nothing")
    assert vllm.gauge("vllm:request_success_total") == finished_before  # not run to its end
    generated = vllm.gauge("vllm:generation_tokens_total") - generated_before
    assert generated < (MAX_MODEL_LEN - 32) // 4, generated
