"""`/v1/responses` on the in-process chat engine (the tiny Llama behind a real `backfill
serve`), served from chat completions: batches through the official `openai` SDK, and the
real-time gateway's `client.responses.create`."""

from __future__ import annotations

import json
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from openai import BadRequestError, OpenAI
from openai.types.responses import Response
from polling import poll

from backfill.testing.server import BackfillProcess

KEY = "sk-local-tests"
RESPONSES = "/v1/responses"
TERMINAL = {"completed", "failed", "expired", "cancelled"}


def client_for(server: BackfillProcess) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key=KEY, max_retries=1, timeout=60.0)


def line(cid: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": cid, "method": "POST", "url": RESPONSES, "body": {"model": "tiny", **body}}


def rows(client: OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    if file_id is None:
        return {}
    text = client.files.content(file_id).text
    return {r["custom_id"]: r for r in (json.loads(x) for x in text.splitlines() if x.strip())}


def prompt_len(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return len(ids)


def test_responses_batch_served_from_chat(
    local_server: BackfillProcess, tiny_tokenizer: Any
) -> None:
    client = client_for(local_server)
    lines = [
        line(f"s{i}", input=f"tell me about robot {i}", max_output_tokens=5, temperature=0)
        for i in range(3)
    ]
    lines.append(
        line(
            "items",
            instructions="Be brief.",
            input=[{"role": "user", "content": [{"type": "input_text", "text": "hello world"}]}],
            max_output_tokens=6,
            seed=1,
        )
    )
    lines.append(
        line("tools", input="x", tools=[{"type": "function", "name": "f", "parameters": {}}])
    )
    image = {"type": "input_image", "image_url": "http://example.invalid/a.png"}
    lines.append(line("image", input=[{"role": "user", "content": [image]}]))
    data = ("\n".join(json.dumps(x) for x in lines) + "\n").encode()
    file = client.files.create(file=("in.jsonl", data), purpose="batch")
    created = client.batches.create(
        input_file_id=file.id, endpoint=RESPONSES, completion_window="24h"
    )
    batch = poll(
        lambda: client.batches.retrieve(created.id),
        lambda b: b.status in TERMINAL,
        what="the responses batch to finish",
        timeout=120,
    )
    assert batch.status == "completed", batch
    out, err = rows(client, batch.output_file_id), rows(client, batch.error_file_id)
    assert set(out) == {"s0", "s1", "s2", "items"} and set(err) == {"tools", "image"}

    statuses = []
    for cid, row in out.items():
        body = row["response"]["body"]
        parsed = Response.model_validate(body)
        assert body["object"] == "response" and body["id"].startswith("resp_")
        assert body["model"] == "tiny" and isinstance(parsed.output_text, str)
        cap = 6 if cid == "items" else 5
        usage = body["usage"]
        src = next(x for x in lines if x["custom_id"] == cid)["body"]
        messages = (
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"}]
            if cid == "items"
            else [{"role": "user", "content": src["input"]}]
        )
        assert usage["input_tokens"] == prompt_len(tiny_tokenizer, messages)
        assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
        statuses.append(body["status"])
        if body["status"] == "incomplete":
            assert body["incomplete_details"] == {"reason": "max_output_tokens"}
            assert usage["output_tokens"] == cap
        else:
            assert body["status"] == "completed" and usage["output_tokens"] <= cap
    assert "incomplete" in statuses  # random weights rarely stop before the cap
    assert batch.usage is not None
    assert batch.usage.input_tokens == sum(
        r["response"]["body"]["usage"]["input_tokens"] for r in out.values()
    )
    assert batch.usage.output_tokens == sum(
        r["response"]["body"]["usage"]["output_tokens"] for r in out.values()
    )

    tools = err["tools"]["response"]
    assert tools["status_code"] == 400
    assert tools["body"]["error"]["param"] == "tools"
    assert tools["body"]["error"]["code"] == "unsupported_parameter"
    image_error = err["image"]["response"]["body"]["error"]
    assert (image_error["param"], image_error["code"]) == (
        "input[0].content[0]",
        "unsupported_input",
    )


def test_real_time_responses_on_the_in_process_engine(local_server: BackfillProcess) -> None:
    client = client_for(local_server)
    answer = client.responses.create(model="tiny", input="hello there", max_output_tokens=4)
    assert answer.object == "response" and answer.usage is not None
    assert answer.usage.output_tokens <= 4
    assert isinstance(answer.output_text, str)
    with pytest.raises(BadRequestError) as info:
        client.responses.create(
            model="tiny", input="x", tools=[{"type": "web_search"}], max_output_tokens=4
        )
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "tools"
