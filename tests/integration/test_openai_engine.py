"""OpenAIEngine + Dispatcher against the real test upstream, in a subprocess, on loopback."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import orjson
import pytest

from backfill.dispatch import Dispatcher
from backfill.domain.retry import RetryPolicy
from backfill.engines.openai import OpenAIEngine, join_url
from backfill.engines.registry import build_engines
from backfill.errors import EngineUnavailable, InvalidRequest
from backfill.settings import ModelConfig
from backfill.testing import UpstreamProcess, start_upstream

T = TypeVar("T")
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamProcess]:
    with start_upstream() as up:
        yield up


def chat(text: str, model: str = "llama") -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}],
    }


def with_engine(config: ModelConfig, use: Callable[[OpenAIEngine], Awaitable[T]]) -> T:
    async def scenario() -> T:
        engine = OpenAIEngine(config)
        await engine.start()
        try:
            return await use(engine)
        finally:
            await engine.close()

    return asyncio.run(asyncio.wait_for(scenario(), timeout=20))


def dispatcher_for(engine: OpenAIEngine, attempts: int = 3) -> tuple[Dispatcher, list[float]]:
    delays: list[float] = []

    async def record(seconds: float) -> None:
        delays.append(seconds)

    policy = RetryPolicy(attempts=attempts, base_delay=0.001, max_delay=0.01)
    return Dispatcher(engine, max_concurrency=8, policy=policy, sleep=record), delays


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_chat_echo_and_usage(upstream: UpstreamProcess) -> None:
    config = ModelConfig(name="llama", url=upstream.url)

    async def use(engine: OpenAIEngine) -> None:
        dispatcher, _ = dispatcher_for(engine)
        outcome = await dispatcher.run(CHAT, chat("hello there world"))
        assert outcome.status == 200 and outcome.ok
        assert outcome.request_id and outcome.request_id.startswith("req-")
        body = orjson.loads(outcome.body)
        assert body["object"] == "chat.completion"
        assert body["id"].startswith("chatcmpl-")
        assert body["model"] == "llama"
        assert body["choices"][0]["message"]["content"] == "echo: hello there world"
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}

    with_engine(config, use)


def test_completions_and_embeddings(upstream: UpstreamProcess) -> None:
    config = ModelConfig(name="llama", url=upstream.url)

    async def use(engine: OpenAIEngine) -> None:
        reply = await engine.send("/v1/completions", {"model": "llama", "prompt": "one two"})
        body = orjson.loads(reply.body)
        assert body["object"] == "text_completion"
        assert body["choices"][0]["text"] == "echo: one two"
        assert body["usage"]["total_tokens"] == 5
        reply = await engine.send("/v1/embeddings", {"model": "llama", "input": ["a b", "c"]})
        body = orjson.loads(reply.body)
        vectors = [d["embedding"] for d in body["data"]]
        assert len(vectors) == 2 and all(len(v) == 8 for v in vectors) and vectors[0] != vectors[1]
        assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
        again = await engine.send("/v1/embeddings", {"model": "llama", "input": "a b"})
        assert orjson.loads(again.body)["data"][0]["embedding"] == vectors[0]  # deterministic

    with_engine(config, use)


def test_model_renamed_without_touching_callers_body(upstream: UpstreamProcess) -> None:
    config = ModelConfig(name="llama", url=upstream.url, upstream_name="meta/Llama-3-8B")
    request = chat("rename me")

    async def use(engine: OpenAIEngine) -> None:
        reply = await engine.send(CHAT, request)
        assert orjson.loads(reply.body)["model"] == "meta/Llama-3-8B"

    with_engine(config, use)
    assert request["model"] == "llama"


@pytest.mark.parametrize("base", ["", "/v1", "/v1/"])
def test_base_url_with_or_without_v1(upstream: UpstreamProcess, base: str) -> None:
    config = ModelConfig(name="llama", url=upstream.base + base)

    async def use(engine: OpenAIEngine) -> None:
        assert (await engine.send(CHAT, chat("where"))).status == 200

    with_engine(config, use)


def test_join_url() -> None:
    assert join_url("http://h:1/v1", CHAT) == "http://h:1/v1/chat/completions"
    assert join_url("http://h:1/v1/", CHAT) == "http://h:1/v1/chat/completions"
    assert join_url("http://h:1", CHAT) == "http://h:1/v1/chat/completions"
    assert join_url("http://h/openai/v1", CHAT) == "http://h/openai/v1/chat/completions"
    assert join_url("http://h/openai", CHAT) == "http://h/openai/v1/chat/completions"


def test_client_error_passes_through_unretried(upstream: UpstreamProcess) -> None:
    config = ModelConfig(name="llama", url=upstream.url)
    text = "too long #fail400"

    async def use(engine: OpenAIEngine) -> None:
        dispatcher, delays = dispatcher_for(engine)
        outcome = await dispatcher.run(CHAT, chat(text))
        assert outcome.status == 400 and outcome.attempts == 1 and delays == []
        error = orjson.loads(outcome.body)["error"]
        assert error["code"] == "context_length_exceeded"
        assert error["type"] == "invalid_request_error"
        assert error["param"] == "messages"
        assert "message" in error

    with_engine(config, use)
    assert upstream.stats()["by_text"][text] == 1


def test_server_errors_retried_to_success(upstream: UpstreamProcess) -> None:
    config = ModelConfig(name="llama", url=upstream.url)
    text = "flaky #fail500:2"

    async def use(engine: OpenAIEngine) -> None:
        dispatcher, delays = dispatcher_for(engine, attempts=3)
        outcome = await dispatcher.run(CHAT, chat(text))
        assert outcome.status == 200 and outcome.attempts == 3
        assert orjson.loads(outcome.body)["choices"][0]["message"]["content"] == "echo: " + text
        assert len(delays) == 2
        assert dispatcher.stats.retried == 2

    with_engine(config, use)
    assert upstream.stats()["by_text"][text] == 3


def test_server_errors_exhaust_attempts(upstream: UpstreamProcess) -> None:
    config = ModelConfig(name="llama", url=upstream.url)

    async def use(engine: OpenAIEngine) -> None:
        dispatcher, _ = dispatcher_for(engine, attempts=2)
        outcome = await dispatcher.run(CHAT, chat("always down #fail500"))
        assert outcome.status == 500 and outcome.attempts == 2
        assert orjson.loads(outcome.body)["error"]["type"] == "server_error"

    with_engine(config, use)


def test_rate_limit_retry_after_honoured(upstream: UpstreamProcess) -> None:
    config = ModelConfig(name="llama", url=upstream.url)

    async def use(engine: OpenAIEngine) -> None:
        reply = await engine.send(CHAT, chat("busy #fail429:1:2"))
        assert reply.status == 429 and reply.retry_after == 2.0
        dispatcher, delays = dispatcher_for(engine)
        outcome = await dispatcher.run(CHAT, chat("slow down #fail429:1:3"))
        assert outcome.status == 200 and outcome.attempts == 2
        assert delays == [3.0]

    with_engine(config, use)


def test_real_sleep_between_attempts(upstream: UpstreamProcess) -> None:
    """Retry-After: 0 with the real asyncio.sleep: the whole path works end to end."""
    config = ModelConfig(name="llama", url=upstream.url)

    async def use(engine: OpenAIEngine) -> None:
        policy = RetryPolicy(attempts=3, base_delay=0.005, max_delay=0.01)
        dispatcher = Dispatcher(engine, max_concurrency=4, policy=policy)
        outcome = await dispatcher.run(CHAT, chat("real #fail429:2"))
        assert outcome.status == 200 and outcome.attempts == 3

    with_engine(config, use)


def test_connection_refused() -> None:
    config = ModelConfig(name="llama", url=f"http://127.0.0.1:{free_port()}/v1")

    async def use(engine: OpenAIEngine) -> None:
        with pytest.raises(EngineUnavailable) as info:
            await engine.send(CHAT, chat("anyone?"))
        assert info.value.code == "upstream_unavailable"
        dispatcher, delays = dispatcher_for(engine, attempts=3)
        outcome = await dispatcher.run(CHAT, chat("anyone?"))
        assert outcome.is_transport_error and outcome.status is None
        assert outcome.error_code == "upstream_unavailable" and outcome.attempts == 3
        assert len(delays) == 2

    with_engine(config, use)


def test_dropped_connection_and_timeout(upstream: UpstreamProcess) -> None:
    config = ModelConfig(name="llama", url=upstream.url, timeout=5)

    async def use(engine: OpenAIEngine) -> None:
        with pytest.raises(EngineUnavailable) as info:
            await engine.send(CHAT, chat("bye #close"))
        assert info.value.code == "upstream_unavailable"
        with pytest.raises(EngineUnavailable) as info:
            await engine.send(CHAT, chat("nap #sleep:2000"), timeout=0.05)
        assert info.value.code == "request_timeout"
        # the engine still works after both
        assert (await engine.send(CHAT, chat("still there"))).status == 200

    with_engine(config, use)


def test_api_key_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "sekret")
    with start_upstream(api_key="sekret") as up:
        good = ModelConfig(name="llama", url=up.url, api_key_env="TEST_UPSTREAM_KEY")
        bad = ModelConfig(name="llama", url=up.url)

        async def send(engine: OpenAIEngine) -> tuple[int, bytes]:
            reply = await engine.send(CHAT, chat("who am i"))
            return reply.status, reply.body

        assert with_engine(good, send)[0] == 200
        status, body = with_engine(bad, send)
        assert status == 401
        assert orjson.loads(body)["error"]["code"] == "invalid_api_key"


def test_concurrent_load_through_dispatcher(upstream: UpstreamProcess) -> None:
    upstream.reset()
    config = ModelConfig(name="llama", url=upstream.url, max_concurrency=32)

    async def use(engine: OpenAIEngine) -> None:
        dispatcher = Dispatcher(engine, max_concurrency=32, policy=RetryPolicy(attempts=2))
        texts = [f"n {i}" + (" #sleep:20" if i % 50 == 0 else "") for i in range(500)]
        outcomes = await asyncio.gather(*(dispatcher.run(CHAT, chat(t)) for t in texts))
        assert all(o.status == 200 for o in outcomes)
        replies = [orjson.loads(o.body)["choices"][0]["message"]["content"] for o in outcomes]
        assert replies == ["echo: " + t for t in texts]
        assert dispatcher.stats.succeeded == 500 and dispatcher.stats.in_flight == 0

    with_engine(config, use)
    assert upstream.stats()["requests"] == 500


def test_upstream_answers_pipelined_requests_in_order(upstream: UpstreamProcess) -> None:
    def request(text: str) -> bytes:
        body = orjson.dumps(chat(text))
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    with socket.create_connection(("127.0.0.1", upstream.port), timeout=5) as sock:
        sock.sendall(request("first #sleep:100") + request("second"))
        data = b""
        while data.count(b"echo: ") < 2:
            chunk = sock.recv(65536)
            assert chunk, "connection closed early"
            data += chunk
    assert data.index(b"echo: first") < data.index(b"echo: second")


def test_registry() -> None:
    engines = build_engines([ModelConfig(name="a", url="http://127.0.0.1:1/v1")])
    assert isinstance(engines["a"], OpenAIEngine)
    assert engines["a"].model == "a"
    with pytest.raises(InvalidRequest, match="unknown engine kind 'vllm-magic'"):
        build_engines([ModelConfig(name="b", kind="vllm-magic", url="http://x/v1")])
    with pytest.raises(InvalidRequest, match="configured twice"):
        build_engines(
            [ModelConfig(name="a", url="http://x/v1"), ModelConfig(name="a", url="http://y/v1")]
        )
