"""The real-time gateway through a real `backfill serve`, the test upstream and the simulator.

Own server (module scope): its config declares a priority-capable model on the simulator, the
same test upstream once with and once without `priority = true`, and a small per-project
real-time rate limit (each test uses its own project, so the limit test is isolated).
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI
from polling import poll

from backfill.domain.usage import REALTIME, UsageEntry
from backfill.sim import SimProcess, start_sim
from backfill.sim.metrics import parse as parse_metrics
from backfill.store import open_store
from backfill.testing import UpstreamProcess, start_upstream
from backfill.testing.server import BackfillProcess

CLI = [sys.executable, "-m", "backfill.cli.main"]
RPM = 20
PROJECTS = ("stream", "plain", "limit", "prio", "errors", "narrow", "ledger")


def create_key(data_dir: Path, project: str) -> str:
    out = subprocess.run(
        [*CLI, "keys", "create", "--project", project, "--data-dir", str(data_dir)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.stdout.split()[-1]


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamProcess]:
    with start_upstream() as up:
        yield up


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    with start_sim(speedup=20) as s:
        yield s


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    data_dir = tmp_path_factory.mktemp("realtime")
    return data_dir, {p: create_key(data_dir, p) for p in PROJECTS}


@pytest.fixture(scope="module")
def server(
    upstream: UpstreamProcess, sim: SimProcess, keys: tuple[Path, dict[str, str]]
) -> Iterator[BackfillProcess]:
    data_dir, _ = keys
    config = data_dir / "backfill.toml"
    config.write_text(
        f"""
[models.echo]
url = "{upstream.url}"

[models.echo-prio]
url = "{upstream.url}"
priority = true

[models.echo-narrow]
url = "{upstream.url}"
max_concurrency = 2

[models.llama]
url = "{sim.url}"
upstream_name = "{sim.model_name}"
priority = true

[prices.echo]
input = 2.5
output = 10

[prices.llama]
input = 0.15
cached_input = 0.075
output = 0.6
"""
    )
    env = {
        "BACKFILL_REALTIME_RPM": str(RPM),
        "BACKFILL_SCHEDULER_INTERVAL": "0.1",
        "BACKFILL_FLUSH_EVERY_SECONDS": "0.1",
    }
    proc = BackfillProcess(data_dir, extra_args=["--config", str(config)], env=env)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def client(server: BackfillProcess, keys: tuple[Path, dict[str, str]], project: str) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key=keys[1][project], max_retries=0, timeout=30)


def post(
    server: BackfillProcess, path: str, body: dict[str, Any], key: str | None
) -> tuple[int, dict[str, str], dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(
        server.base_url + path, data=json.dumps(body).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def last_priority(upstream: UpstreamProcess) -> Any:
    with urllib.request.urlopen(upstream.base + "/stats", timeout=5) as resp:
        return json.loads(resp.read())["last_priority"]


def assert_envelope(body: dict[str, Any]) -> dict[str, Any]:
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_streaming_is_relayed_chunk_by_chunk_from_the_simulator(server, keys) -> None:  # type: ignore[no-untyped-def]
    sdk = client(server, keys, "stream")
    chunks = list(
        sdk.chat.completions.create(
            model="llama",
            messages=[{"role": "user", "content": "tell me a story"}],
            max_tokens=40,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) > 1  # streamed, not one buffered answer
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 40
    assert chunks[-1].model_extra is not None and "sim" in chunks[-1].model_extra
    whole = sdk.chat.completions.create(
        model="llama", messages=[{"role": "user", "content": "tell me a story"}], max_tokens=40
    )
    assert whole.choices[0].message.content == text


def test_streaming_completions_from_the_test_upstream(server, keys) -> None:  # type: ignore[no-untyped-def]
    sdk = client(server, keys, "stream")
    stream = sdk.completions.create(model="echo", prompt="one two three", stream=True)
    assert "".join(c.choices[0].text for c in stream) == "echo: one two three"


def test_non_streaming_chat_completions_and_embeddings(server, keys) -> None:  # type: ignore[no-untyped-def]
    sdk = client(server, keys, "plain")
    chat = sdk.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "hello world"}]
    )
    assert chat.choices[0].message.content == "echo: hello world"
    assert chat.usage is not None and chat.usage.prompt_tokens == 2
    completion = sdk.completions.create(model="echo", prompt="abc")
    assert completion.choices[0].text == "echo: abc"
    emb = sdk.embeddings.create(model="echo", input=["a", "b"])
    assert len(emb.data) == 2
    sim_answer = sdk.chat.completions.create(
        model="llama", messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )
    assert sim_answer.usage is not None and sim_answer.usage.completion_tokens == 5


def test_rate_limit_per_project_answers_429_with_retry_after(server, keys) -> None:  # type: ignore[no-untyped-def]
    key = keys[1]["limit"]
    body = {"model": "echo", "messages": [{"role": "user", "content": "x"}]}
    statuses = [post(server, "/chat/completions", body, key)[0] for _ in range(RPM)]
    assert statuses == [200] * RPM
    status, headers, answer = post(server, "/chat/completions", body, key)
    assert status == 429
    assert int(headers["retry-after"]) >= 1
    error = assert_envelope(answer)
    assert error["code"] == "rate_limit_exceeded"
    assert error["type"] == "rate_limit_error"
    # another project is not limited by this one
    assert post(server, "/chat/completions", body, keys[1]["errors"])[0] == 200


def test_auth_and_unknown_model_envelopes(server, keys) -> None:  # type: ignore[no-untyped-def]
    body = {"model": "echo", "messages": [{"role": "user", "content": "x"}]}
    status, _, answer = post(server, "/chat/completions", body, None)
    assert status == 401
    assert assert_envelope(answer)["type"] == "authentication_error"
    status, _, answer = post(server, "/chat/completions", body, "sk-wrong-key-123456")
    assert status == 401
    assert assert_envelope(answer)["code"] == "invalid_api_key"
    key = keys[1]["errors"]
    status, _, answer = post(server, "/embeddings", {"model": "nope", "input": "x"}, key)
    assert status == 404
    error = assert_envelope(answer)
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    status, _, answer = post(server, "/chat/completions", {"messages": []}, key)
    assert status == 400
    assert assert_envelope(answer)["param"] == "model"


def test_upstream_errors_pass_through(server, keys) -> None:  # type: ignore[no-untyped-def]
    key = keys[1]["errors"]
    body = {"model": "llama", "messages": [{"role": "user", "content": "x"}], "priority": "high"}
    status, _, answer = post(server, "/chat/completions", body, key)
    assert status == 400  # the simulator, like vLLM, rejects a priority that is not an int
    assert assert_envelope(answer)["param"] == "priority"
    body = {"model": "echo", "messages": [{"role": "user", "content": "#fail400"}]}
    status, _, answer = post(server, "/chat/completions", body, key)
    assert status == 400
    assert assert_envelope(answer)["code"] == "context_length_exceeded"


def test_priority_is_sent_only_to_priority_capable_models(server, keys, upstream) -> None:  # type: ignore[no-untyped-def]
    sdk = client(server, keys, "prio")
    messages = [{"role": "user", "content": "p"}]
    sdk.chat.completions.create(model="echo-prio", messages=messages)  # type: ignore[arg-type]
    assert last_priority(upstream) == 0  # realtime_priority
    sdk.chat.completions.create(model="echo", messages=messages)  # type: ignore[arg-type]
    assert last_priority(upstream) is None  # a plain upstream gets the body unchanged
    sdk.chat.completions.create(
        model="echo-prio",
        messages=messages,  # type: ignore[arg-type]
        extra_body={"priority": 3},
    )
    assert last_priority(upstream) == 3  # the client's own priority is kept
    # batch requests go at batch_priority
    line = {
        "custom_id": "b1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "echo-prio", "messages": messages},
    }
    f = sdk.files.create(file=("in.jsonl", json.dumps(line).encode()), purpose="batch")
    batch = sdk.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    poll(
        lambda: sdk.batches.retrieve(batch.id).status == "completed",
        what="the batch to complete",
        interval=0.1,
    )
    assert last_priority(upstream) == 10


def test_real_time_does_not_wait_behind_a_full_batch_window(server, keys, upstream) -> None:  # type: ignore[no-untyped-def]
    # the batch holds every slot of the model's window (2) at the upstream for a minute; a
    # real-time request to the same model still goes straight through (it shares the engine's
    # HTTP session, which must not queue it behind the batch's connections)
    sdk = client(server, keys, "narrow")
    texts = [f"#sleep:60000 held {i}" for i in range(2)]
    lines = [
        {
            "custom_id": f"held-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "echo-narrow", "messages": [{"role": "user", "content": text}]},
        }
        for i, text in enumerate(texts)
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    f = sdk.files.create(file=("held.jsonl", data), purpose="batch")
    batch = sdk.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    def seen() -> dict[str, int]:
        with urllib.request.urlopen(upstream.base + "/stats", timeout=5) as resp:
            by_text: dict[str, int] = json.loads(resp.read())["by_text"]
        return by_text

    poll(
        seen,
        lambda by_text: all(text in by_text for text in texts),
        what="the batch requests to reach the upstream",
        timeout=30,
    )
    quick = client(server, keys, "narrow").with_options(timeout=20)
    answer = quick.chat.completions.create(
        model="echo-narrow", messages=[{"role": "user", "content": "real time"}]
    )
    assert answer.choices[0].message.content == "echo: real time"
    assert sdk.batches.retrieve(batch.id).request_counts.completed == 0  # still held  # type: ignore[union-attr]
    sdk.batches.cancel(batch.id)


def scrape(server: BackfillProcess) -> dict[str, float]:
    """`GET /metrics` (no key) as {'name{labels}': value}."""
    with urllib.request.urlopen(server.base_url.removesuffix("/v1") + "/metrics", timeout=10) as r:
        assert r.headers["content-type"].startswith("text/plain")
        return parse_metrics(r.read().decode(), drop_labels=())


def test_metrics_show_batch_and_real_time_per_model(server, keys) -> None:  # type: ignore[no-untyped-def]
    before = scrape(server)
    # every model has its batch window and, governed by default, its governor's decision
    assert before['backfill_batch_limit{model="echo-narrow"}'] <= 2  # max_concurrency: the ceiling
    assert before['backfill_governor_knee{model="echo-narrow"}'] > 0
    assert before['backfill_governor_engine_metrics{model="echo-narrow"}'] == 0  # no /metrics
    assert before['backfill_governor_knee{model="llama"}'] > 0
    assert before['backfill_batch_limit{model="llama"}'] >= 1
    sdk = client(server, keys, "plain")
    for _ in range(3):
        sdk.chat.completions.create(model="echo", messages=[{"role": "user", "content": "m"}])
    after = scrape(server)
    key = 'backfill_realtime_requests_total{model="echo"}'
    assert after[key] == before[key] + 3
    assert after['backfill_realtime_in_flight{model="echo"}'] == 0


def test_each_request_lands_in_the_usage_ledger_once_at_full_price(server, keys) -> None:  # type: ignore[no-untyped-def]
    """A whole answer and a stream (usage in its last event), each one entry of kind
    `realtime` with the answer's tokens, priced at the full price of `[prices.MODEL]`."""
    data_dir, _ = keys
    sdk = client(server, keys, "ledger")
    chat = sdk.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "one two three"}]
    )
    chunks = list(
        sdk.chat.completions.create(
            model="llama",
            messages=[{"role": "user", "content": "a story"}],
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chat.usage is not None and chunks[-1].usage is not None
    store = open_store(f"sqlite:///{data_dir / 'backfill.db'}")
    try:
        project = store.ensure_project("ledger")

        def entries() -> list[UsageEntry]:
            return store.usage_entries(project_id=project.id)

        found = poll(entries, lambda e: len(e) >= 2, what="two ledger entries", timeout=10)
        [key] = store.list_api_keys("ledger")
    finally:
        store.close()
    assert len(found) == 2  # once each, nothing more
    by_model = {e.model: e for e in found}
    whole, streamed = by_model["echo"], by_model["llama"]
    for e in found:
        assert (e.kind, e.requests, e.batch_id, e.api_key_id) == (REALTIME, 1, None, key.id)
        assert e.endpoint == "/v1/chat/completions"
        assert e.ref.startswith("rt:")
    u = chat.usage
    assert (whole.input_tokens, whole.output_tokens) == (u.prompt_tokens, u.completion_tokens)
    # $2.50 / $10 per million tokens: micro-units per token, at full price, rounded half up
    # ("one two three": 3 prompt tokens = 7.5 micro-units, so 8 plus the output's)
    expected = (25 * u.prompt_tokens + 5) // 10 + 10 * u.completion_tokens
    assert (whole.cost_micros, whole.list_micros, whole.currency) == (expected, expected, "usd")
    s = chunks[-1].usage
    assert (streamed.input_tokens, streamed.output_tokens) == (s.prompt_tokens, 12)
    assert streamed.output_tokens == s.completion_tokens
    assert streamed.engine_ms > 0
    # 0.15 per input token and 0.6 per output token in micro-units, rounded half up
    exact_pico = 150_000 * s.prompt_tokens + 600_000 * s.completion_tokens
    assert streamed.cost_micros == streamed.list_micros == (exact_pico + 500_000) // 10**6
