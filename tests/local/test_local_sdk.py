"""The in-process engines behind a real `backfill serve`, driven by the official `openai` SDK:
the tiny Llama for chat and completions, the packaged MiniLM for embeddings."""

from __future__ import annotations

import base64
import json
import math
import struct
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from openai import OpenAI
from polling import poll

from backfill.testing.server import BackfillProcess

KEY = "sk-local-tests"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
TERMINAL = {"completed", "failed", "expired", "cancelled"}


def client_for(server: BackfillProcess) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key=KEY, max_retries=1, timeout=30.0)


def line(cid: str, url: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"custom_id": cid, "method": "POST", "url": url, "body": body}


def chat(cid: str, content: str, **body: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": content}]
    return line(cid, CHAT, {"model": "tiny", "messages": messages, **body})


def submit(client: OpenAI, lines: list[dict[str, Any]], endpoint: str) -> str:
    data = ("\n".join(json.dumps(x) for x in lines) + "\n").encode()
    f = client.files.create(file=("in.jsonl", data), purpose="batch")
    batch = client.batches.create(
        input_file_id=f.id,
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window="24h",
    )
    return batch.id


def finish(client: OpenAI, batch_id: str, timeout: float = 120.0) -> Any:
    return poll(
        lambda: client.batches.retrieve(batch_id),
        lambda batch: batch.status in TERMINAL,
        what=f"batch {batch_id} to finish",
        timeout=timeout,
    )


def results(client: OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    if file_id is None:
        return {}
    text = client.files.content(file_id).text
    rows = [json.loads(x) for x in text.splitlines() if x.strip()]
    return {r["custom_id"]: r for r in rows}


def run(client: OpenAI, lines: list[dict[str, Any]], endpoint: str = CHAT) -> tuple[Any, ...]:
    batch = finish(client, submit(client, lines, endpoint))
    assert batch.status == "completed", batch
    return batch, results(client, batch.output_file_id), results(client, batch.error_file_id)


def prompt_len(tokenizer: Any, content: str) -> int:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    return len(ids)


def test_chat_max_tokens_finish_reason_usage_and_seed(
    local_server: BackfillProcess, tiny_tokenizer: Any
) -> None:
    client = client_for(local_server)
    prompts = [f"tell me a story about a robot {w}" for w in ("one", "two", "three", "four")]
    lines = [chat(f"g{i}", p, max_tokens=7, temperature=0) for i, p in enumerate(prompts)]
    lines += [chat(f"m{i}", p, max_completion_tokens=5) for i, p in enumerate(prompts)]
    lines += [chat(f"s{i}", "hello world", temperature=1.0, seed=42, max_tokens=12) for i in (1, 2)]
    lines.append(chat("n3", "hello world", n=3, seed=7, max_tokens=6))
    batch, out, err = run(client, lines)
    assert not err and len(out) == len(lines)

    reasons = []
    for cid, row in out.items():
        body = row["response"]["body"]
        assert row["response"]["status_code"] == 200 and body["object"] == "chat.completion"
        cap = {"g": 7, "m": 5, "s": 12, "n": 6}[cid[0]]
        content = next(x for x in lines if x["custom_id"] == cid)["body"]["messages"][0]["content"]
        usage = body["usage"]
        assert usage["prompt_tokens"] == prompt_len(tiny_tokenizer, content)
        generated = 0
        for choice in body["choices"]:
            assert choice["finish_reason"] in ("stop", "length")
            reasons.append(choice["finish_reason"])
            assert isinstance(choice["message"]["content"], str)
        # every choice's tokens are counted, once each; `length` means exactly the cap
        lengths = [cap if c["finish_reason"] == "length" else None for c in body["choices"]]
        if all(n is not None for n in lengths):
            generated = sum(n for n in lengths if n is not None)
            assert usage["completion_tokens"] == generated
        else:
            # a choice that stopped may have stopped on its last allowed token (the end-of-text
            # token, sampled at the cap), so at most the cap each
            assert usage["completion_tokens"] <= cap * len(body["choices"])
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert "length" in reasons
    assert len(out["n3"]["response"]["body"]["choices"]) == 3

    # seeded sampling: the same seed gives the same text, in one batch and in another batch
    text = out["s1"]["response"]["body"]["choices"][0]["message"]["content"]
    assert text == out["s2"]["response"]["body"]["choices"][0]["message"]["content"]
    _, again, _ = run(client, [chat("s3", "hello world", temperature=1.0, seed=42, max_tokens=12)])
    assert again["s3"]["response"]["body"]["choices"][0]["message"]["content"] == text
    assert batch.usage.input_tokens == sum(
        r["response"]["body"]["usage"]["prompt_tokens"] for r in out.values()
    )


def test_stop_string_cuts_the_text(local_server: BackfillProcess) -> None:
    client = client_for(local_server)
    _, out, _ = run(client, [chat("free", "the quick brown fox", temperature=0, max_tokens=10)])
    words = out["free"]["response"]["body"]["choices"][0]["message"]["content"].split()
    if len(words) < 3:
        pytest.skip(f"the random model ended early: {words}")
    stop = words[2]
    body = {"temperature": 0, "max_tokens": 10, "stop": [stop]}
    _, out, _ = run(client, [chat("cut", "the quick brown fox", **body)])
    choice = out["cut"]["response"]["body"]["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert stop not in choice["message"]["content"].split()[: words.index(stop) + 1]
    assert choice["message"]["content"].split() == words[: words.index(stop)]


def test_completions_usage_and_length(local_server: BackfillProcess, tiny_tokenizer: Any) -> None:
    client = client_for(local_server)
    prompt = "the model answers questions about science"
    lines = [
        line("c1", COMPLETIONS, {"model": "tiny", "prompt": prompt, "max_tokens": 5, "seed": 3}),
        line("c2", COMPLETIONS, {"model": "tiny", "prompt": prompt, "max_tokens": 5, "seed": 3}),
    ]
    _, out, err = run(client, lines, COMPLETIONS)
    assert not err
    expected_prompt = len(tiny_tokenizer(prompt)["input_ids"])
    for row in out.values():
        body = row["response"]["body"]
        assert body["object"] == "text_completion"
        assert body["usage"]["prompt_tokens"] == expected_prompt
        choice = body["choices"][0]
        if choice["finish_reason"] == "length":
            assert body["usage"]["completion_tokens"] == 5
        else:
            assert body["usage"]["completion_tokens"] < 5
    texts = {r["response"]["body"]["choices"][0]["text"] for r in out.values()}
    assert len(texts) == 1  # same seed, same text


def test_context_overflow_goes_to_the_error_file(local_server: BackfillProcess) -> None:
    client = client_for(local_server)
    long = " ".join(["hello world how are you today"] * 40)  # > 128 tokens of context
    lines = [chat("ok1", "hello", max_tokens=4), chat("big", long), chat("ok2", "hi", max_tokens=4)]
    lines.append(chat("big2", "hello", max_tokens=500))  # prompt + max_tokens > context
    batch, out, err = run(client, lines)
    assert set(out) == {"ok1", "ok2"}
    assert set(err) == {"big", "big2"}
    for row in err.values():
        assert row["response"]["status_code"] == 400
        assert row["response"]["body"]["error"]["code"] == "context_length_exceeded"
    assert batch.request_counts.completed == 2 and batch.request_counts.failed == 2


def test_api_answers_while_generating(local_server: BackfillProcess) -> None:
    client = client_for(local_server)
    lines = [chat(f"r{i}", f"summarize this document {i}", max_tokens=100) for i in range(300)]
    batch_id = submit(client, lines, CHAT)
    latencies: list[float] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        batch = client.batches.retrieve(batch_id)
        elapsed = time.perf_counter() - t0
        assert batch.id == batch_id  # answered
        if batch.status in TERMINAL:
            break
        if batch.status == "in_progress":
            latencies.append(elapsed)
        time.sleep(0.05)
    batch = finish(client, batch_id)
    assert batch.status == "completed" and batch.request_counts.completed == 300
    assert latencies, "never saw the batch in progress"
    latencies.sort()
    print(
        f"\nGET /v1/batches/{{id}} during generation: {len(latencies)} samples, "
        f"median {latencies[len(latencies) // 2] * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms"
    )


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_minilm_embeddings(local_server: BackfillProcess, minilm_dir: Path) -> None:
    from transformers import AutoTokenizer

    client = client_for(local_server)
    texts = ["a cat sat on the mat", "a kitten rested on the rug", "quarterly revenue rose 4%"]
    lines = [
        line(f"e{i}", EMBEDDINGS, {"model": "minilm", "input": t}) for i, t in enumerate(texts)
    ]
    b64 = {"model": "minilm", "input": texts[0], "encoding_format": "base64"}
    lines.append(line("b64", EMBEDDINGS, b64))
    lines.append(line("many", EMBEDDINGS, {"model": "minilm", "input": texts}))
    bad_dims = {"model": "minilm", "input": texts[0], "dimensions": 100}
    lines.append(line("dims", EMBEDDINGS, bad_dims))
    _, out, err = run(client, lines, EMBEDDINGS)
    assert set(err) == {"dims"} and err["dims"]["response"]["status_code"] == 400

    vec = [out[f"e{i}"]["response"]["body"]["data"][0]["embedding"] for i in range(3)]
    assert all(len(v) == 384 for v in vec)
    cat_kitten, cat_revenue, kitten_revenue = (
        _cos(vec[0], vec[1]),
        _cos(vec[0], vec[2]),
        _cos(vec[1], vec[2]),
    )
    print(
        f"\ncosine cat/kitten {cat_kitten:.3f}, cat/revenue {cat_revenue:.3f}, "
        f"kitten/revenue {kitten_revenue:.3f}"
    )
    assert cat_kitten > cat_revenue and cat_kitten > kitten_revenue

    raw = base64.b64decode(out["b64"]["response"]["body"]["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert len(decoded) == 384
    # the same text, possibly in another forward batch: equal up to float32 noise
    assert max(abs(x - y) for x, y in zip(decoded, vec[0], strict=True)) < 1e-5

    tok = AutoTokenizer.from_pretrained(str(minilm_dir), local_files_only=True)
    counts = [len(tok(t)["input_ids"]) for t in texts]
    for i in range(3):
        usage = out[f"e{i}"]["response"]["body"]["usage"]
        assert usage == {"prompt_tokens": counts[i], "total_tokens": counts[i]}
    many = out["many"]["response"]["body"]
    assert [d["index"] for d in many["data"]] == [0, 1, 2]
    assert many["usage"]["prompt_tokens"] == sum(counts)


def test_real_time_gateway_on_in_process_engines(local_server: BackfillProcess) -> None:
    # the same engines answer real-time requests; they do not stream, and say so
    from openai import BadRequestError

    client = client_for(local_server)
    messages = [{"role": "user", "content": "hello there"}]
    answer = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5)  # type: ignore[arg-type]
    assert answer.usage is not None and answer.usage.completion_tokens <= 5
    assert answer.choices[0].finish_reason in ("length", "stop")
    emb = client.embeddings.create(model="minilm", input=["one", "two"])
    assert [len(d.embedding) for d in emb.data] == [384, 384]
    with pytest.raises(BadRequestError) as info:
        client.chat.completions.create(
            model="tiny",
            messages=messages,  # type: ignore[arg-type]
            max_tokens=5,
            stream=True,
        )
    error = info.value.body
    assert isinstance(error, dict)
    assert error["param"] == "stream" and error["code"] == "unsupported_parameter"
    # the refusal left the engine serving
    again = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3)  # type: ignore[arg-type]
    assert again.usage is not None and again.usage.completion_tokens <= 3
