"""The simulator's OpenAI-compatible HTTP server: one engine paced against wall time.

    python -m backfill.sim --profile llama-3.1-8b-h100 --port 8001 --speedup 10

prints `READY <port>` once it listens. Like `backfill.testing.upstream` it speaks HTTP/1.1 on
raw asyncio (an `asyncio.Protocol` fed by `httptools`, uvloop when installed; the plumbing both
share is `backfill.testing.httpserver`) so that the server is never what limits a benchmark;
unlike it, answers come from the engine's step loop and may stream (each request's answer is
written by `backfill.sim.exchange.Exchange` through its `Reply`; a client that goes away
aborts the request in the engine).

Pacing. One task runs the engine: it computes a step (`Engine.step`, which advances the
simulated clock by the step's roofline duration), sleeps until the wall-clock instant that
corresponds to the step's end (`wall = wall0 + (sim - sim0) / speedup`), then delivers the
step's tokens. While idle the simulated clock follows the wall clock at `speedup` x, so queue
times and arrival gaps are consistent. A request that arrives while a step is in flight joins
the waiting queue for the next step, with its arrival time mapped to simulated time. When the
host cannot keep up (the step's wall deadline has already passed by more than `max_lag`),
the mapping is shifted instead of catching up in a burst, and `backfill_sim_lag_seconds_total`
grows: simulated latencies stay exact, only the simulated arrival rate is lower than intended.

Streaming without a write per token: a stream's first token is written at once (so a client's
TTFT is as exact as the wall clock allows), later tokens accumulate and every stream with
pending tokens is flushed once per `stream_interval` of wall time (default 20 ms) and at its
end, each flush one SSE event carrying all pending tokens' text. Chunks follow OpenAI's
format (role chunk, content chunks, a last chunk with `finish_reason`, then a usage chunk when
`stream_options.include_usage` is set, then `data: [DONE]`).

Simulated latencies for clients. Wall-clock latencies at high speedup include Python and
network overhead, so every final answer carries an extension object `"sim"` (in the response
body, and in the last content chunk and the usage chunk of a stream) with simulated seconds:
`queue_s`, `ttft_s`, `tpot_s`, `e2e_s`, `arrival_s`, `finish_s` (simulated clock), plus
`preemptions` and `cached_tokens`. The openai SDK keeps unknown fields: `response.sim` /
`chunk.model_extra["sim"]`.

`--no-metrics` answers 404 to `/metrics`, as an engine without metrics does (llama-cpp-python's
server; llama-server without `--metrics`); with `--max-num-seqs 1` the engine runs one request
at a time and queues the others in arrival order (by `priority` first), as those servers do.

Request fields read: `model` (must be the served name when given), `messages` / `prompt`,
`max_completion_tokens` or `max_tokens` (default 16; exactly that many tokens are generated,
`finish_reason` is `length`), `stream`, `stream_options.include_usage`, `priority` (vLLM's: an
int, lower runs first, default 0), `n` (only 1). Everything else is ignored.

`POST /v1/responses` is served as chat through `backfill.domain.responses_api` (what it cannot
serve, e.g. tools, is a 400), not streamed; `max_output_tokens` (default 16) tokens are
generated, so the `Response` is `incomplete` with reason `max_output_tokens`, as vLLM's would
be for an answer cut at its limit.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson

from backfill.domain.responses_api import request_to_chat
from backfill.errors import InvalidRequest
from backfill.sim.engine import FINISHED, Engine, SimRequest
from backfill.sim.exchange import Exchange
from backfill.sim.metrics import render
from backfill.sim.options import SimOptions
from backfill.sim.profiles import Profile, get_profile
from backfill.sim.tokens import Prompt, chat_prompt, completion_prompt
from backfill.testing.httpserver import (
    Reply,
    Request,
    announce,
    error_body,
    listen,
    port_of,
    response,
)
from backfill.testing.httpserver import run as run_loop

__all__ = ["RequestError", "SimServer", "main", "run", "serve"]

#: request bodies past this get 413
MAX_BODY = 64 * 1024 * 1024


class RequestError(Exception):
    """An OpenAI-shaped error answer."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(message, type_, param, code)


class SimServer:
    """The simulated engine behind an OpenAI-compatible HTTP interface (see the module doc)."""

    def __init__(
        self,
        profile: Profile,
        *,
        speedup: float = 1.0,
        model_name: str | None = None,
        stream_interval: float = 0.02,
        max_lag: float = 0.05,
        metrics: bool = True,
    ) -> None:
        if speedup <= 0:
            raise ValueError("speedup must be positive")
        self.profile = profile
        self.engine = Engine(profile)
        self.speedup = speedup
        self.model_name = model_name or profile.model
        self.stream_interval = stream_interval
        self.max_lag = max_lag
        self.serves_metrics = metrics
        self.lag_s = 0.0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._idle = True
        self._loop = asyncio.get_running_loop()
        self._wall0 = self._loop.time()
        self._sim0 = 0.0
        self._step_start = 0.0
        self._dirty: list[Exchange] = []
        self._last_flush = 0.0
        self._ids = 0

    # ---- clock ---------------------------------------------------------------------------
    def sim_now(self) -> float:
        """The simulated time now (engine clock while idle follows the wall clock)."""
        mapped = self._sim0 + (self._loop.time() - self._wall0) * self.speedup
        engine = self.engine
        if self._idle:
            return max(mapped, engine.now)
        return min(max(mapped, self._step_start), engine.now)

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0, backlog: int = 4096) -> None:
        self._server = await listen(self, host, port, max_body=MAX_BODY, backlog=backlog)
        self.port = port_of(self._server)
        self._task = asyncio.create_task(self._run(), name="sim-engine")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _run(self) -> None:
        engine = self.engine
        loop = self._loop
        while True:
            if not engine.has_work():
                self._idle = True
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._idle:
                self._idle = False
                mapped = self._sim0 + (loop.time() - self._wall0) * self.speedup
                if mapped > engine.now:
                    engine.now = mapped
            self._step_start = engine.now
            result = engine.step()
            if result is None:
                continue
            delay = self._wall0 + (engine.now - self._sim0) / self.speedup - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                if -delay > self.max_lag:
                    self._wall0 -= delay
                    self.lag_s -= delay
                await asyncio.sleep(0)
            self._deliver(result.emitted, result.finished)

    def _deliver(self, emitted: list[SimRequest], finished: list[SimRequest]) -> None:
        dirty = self._dirty
        for request in emitted:
            exchange = request.client
            if exchange is None or not exchange.stream or request.status == FINISHED:
                continue
            if not exchange.started:
                exchange.flush()  # first token: at once
            elif not exchange.dirty:
                exchange.dirty = True
                dirty.append(exchange)
        for request in finished:
            if request.client is not None:
                request.client.finish()
        now = self._loop.time()
        if dirty and now - self._last_flush >= self.stream_interval:
            self._last_flush = now
            for exchange in dirty:
                if exchange.dirty:
                    exchange.flush()
            dirty.clear()

    # ---- requests ------------------------------------------------------------------------
    def handle(self, request: Request, reply: Reply) -> None:
        path = request.url.split(b"?", 1)[0]
        keep_alive = reply.keep_alive
        try:
            if request.method == b"GET":
                reply.end(self._get(path, keep_alive))
            elif request.method != b"POST":
                raise RequestError(405, "Method not allowed")
            elif path in (b"/v1/chat/completions", b"/chat/completions"):
                self._completion(reply, request.body, chat=True)
            elif path in (b"/v1/completions", b"/completions"):
                self._completion(reply, request.body, chat=False)
            elif path in (b"/v1/responses", b"/responses"):
                self._responses(reply, request.body)
            else:
                raise RequestError(404, f"Unknown path {path.decode(errors='replace')}")
        except RequestError as exc:
            reply.end(response(exc.status, exc.body, keep_alive))

    def _get(self, path: bytes, keep_alive: bool) -> bytes:
        if path == b"/health":
            return response(200, b"", keep_alive)
        if path in (b"/v1/models", b"/models"):
            model = {
                "id": self.model_name,
                "object": "model",
                "created": 0,
                "owned_by": "backfill-sim",
                "root": self.profile.model,
                "max_model_len": self.engine.max_len,
            }
            return response(200, orjson.dumps({"object": "list", "data": [model]}), keep_alive)
        if path == b"/metrics" and self.serves_metrics:
            text = self.metrics_text().encode()
            return response(200, text, keep_alive, b"text/plain; version=0.0.4; charset=utf-8")
        if path == b"/sim/stats":
            return response(200, orjson.dumps(self.stats()), keep_alive)
        raise RequestError(404, f"Unknown path {path.decode(errors='replace')}")

    def metrics_text(self) -> str:
        engine = self.engine
        return render(
            engine.metrics,
            model=self.model_name,
            running=engine.num_running,
            waiting=engine.num_waiting,
            kv_usage=engine.kv.usage,
            sim_time=self.sim_now(),
            lag_s=self.lag_s,
        )

    def stats(self) -> dict[str, Any]:
        """A JSON snapshot for benches: clock, load, counters and the profile's sizes."""
        engine = self.engine
        metrics = engine.metrics
        return {
            "profile": self.profile.name,
            "model": self.model_name,
            "speedup": self.speedup,
            "sim_time_s": self.sim_now(),
            "lag_s": self.lag_s,
            "running": engine.num_running,
            "waiting": engine.num_waiting,
            "kv_cache_usage": engine.kv.usage,
            "num_gpu_blocks": engine.kv.num_blocks,
            "max_model_len": engine.max_len,
            "steps": metrics.steps,
            "busy_s": metrics.busy_s,
            "prompt_tokens": metrics.prompt_tokens,
            "generation_tokens": metrics.generation_tokens,
            "preemptions": metrics.preemptions,
            "prefix_cache_queries": metrics.prefix_queries,
            "prefix_cache_hits": metrics.prefix_hits,
            "requests_finished": metrics.requests_finished,
            "requests_aborted": metrics.requests_aborted,
        }

    def _responses(self, reply: Reply, raw: bytes) -> None:
        """`/v1/responses`, served as chat (`backfill.domain.responses_api`); not streamed."""
        body = _json_object(raw)
        if body.get("stream") is True:
            raise RequestError(
                400,
                "The simulator does not stream /v1/responses.",
                param="stream",
                code="unsupported_parameter",
            )
        try:
            chat = request_to_chat(body)
        except InvalidRequest as exc:
            raise RequestError(400, exc.message, param=exc.param, code=exc.code) from None
        self._admit(reply, chat, chat=True, responses=body)

    def _completion(self, reply: Reply, raw: bytes, *, chat: bool) -> None:
        self._admit(reply, _json_object(raw), chat=chat)

    def _admit(
        self,
        reply: Reply,
        body: dict[str, Any],
        *,
        chat: bool,
        responses: dict[str, Any] | None = None,
    ) -> None:
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise RequestError(
                404,
                f"The model `{model}` does not exist.",
                param="model",
                code="model_not_found",
            )
        prompt = self._prompt(body, chat)
        max_tokens = _int_field(body, "max_completion_tokens")
        if max_tokens is None:
            max_tokens = _int_field(body, "max_tokens")
        if max_tokens is None:
            max_tokens = 16
        if max_tokens < 1:
            raise RequestError(400, "max_tokens must be at least 1", param="max_tokens")
        priority = _int_field(body, "priority", allow_negative=True) or 0
        n = _int_field(body, "n")
        if n not in (None, 1):
            raise RequestError(400, "Only n=1 is supported by the simulator", param="n")
        stream = body.get("stream") is True
        options = body.get("stream_options")
        include_usage = (
            stream and isinstance(options, dict) and options.get("include_usage") is True
        )
        limit = self.engine.max_len
        if prompt.num_tokens + max_tokens > limit:
            where = "messages" if chat else "prompt"
            raise RequestError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {prompt.num_tokens + max_tokens} tokens ({prompt.num_tokens} in "
                f"the {where}, {max_tokens} in the completion). Please reduce the length of "
                f"the {where} or completion.",
                param=where,
                code="context_length_exceeded",
            )
        self._ids += 1
        prefix = "chatcmpl-sim" if chat else "cmpl-sim"
        exchange = Exchange(
            reply,
            self,
            chat=chat,
            stream=stream,
            include_usage=include_usage,
            response_id=f"{prefix}{self._ids}",
            model=self.model_name,
            responses=responses,
        )
        request = SimRequest(
            exchange.response_id,
            prompt,
            max_tokens,
            priority=priority,
            arrival=self.sim_now(),
            client=exchange,
        )
        exchange.request = request
        reply.on_abort = exchange.abort
        if self._idle:
            # the clock catches up with the wall clock before the request joins
            mapped = self._sim0 + (self._loop.time() - self._wall0) * self.speedup
            if mapped > self.engine.now:
                self.engine.now = mapped
        self.engine.add(request)
        self._wake.set()

    def _prompt(self, body: dict[str, Any], chat: bool) -> Prompt:
        block_size = self.profile.block_size
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise RequestError(400, "'messages' must be a non-empty list", param="messages")
            return chat_prompt(messages, block_size)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return completion_prompt(prompt, block_size)
        if isinstance(prompt, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            return completion_prompt(prompt, block_size)
        raise RequestError(
            400, "'prompt' must be a string or a list of token ids (one prompt)", param="prompt"
        )


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise RequestError(400, "We could not parse the JSON body of your request.") from None
    if not isinstance(body, dict):
        raise RequestError(400, "The request body must be a JSON object.")
    return body


def _int_field(body: dict[str, Any], name: str, *, allow_negative: bool = False) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"'{name}' must be an integer", param=name)
    if value < 0 and not allow_negative:
        raise RequestError(400, f"'{name}' must not be negative", param=name)
    return value


async def serve(
    profile: Profile | str = "llama-3.1-8b-h100",
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    speedup: float = 1.0,
    model_name: str | None = None,
    stream_interval: float = 0.02,
    metrics: bool = True,
) -> SimServer:
    """Start a simulator on the running loop; `await server.aclose()` to stop it."""
    if isinstance(profile, str):
        profile = get_profile(profile)
    server = SimServer(
        profile,
        speedup=speedup,
        model_name=model_name,
        stream_interval=stream_interval,
        metrics=metrics,
    )
    await server.start(host, port)
    return server


async def _main(options: SimOptions) -> None:
    overrides: dict[str, Any] = {}
    if options.max_num_seqs is not None:
        overrides["max_num_seqs"] = options.max_num_seqs
    if options.max_num_batched_tokens is not None:
        overrides["max_num_batched_tokens"] = options.max_num_batched_tokens
    if options.long_prefill_token_threshold is not None:
        overrides["long_prefill_token_threshold"] = options.long_prefill_token_threshold
    if options.num_gpu_blocks is not None:
        overrides["num_gpu_blocks_override"] = options.num_gpu_blocks
    server = await serve(
        get_profile(options.profile, **overrides),
        options.host,
        options.port,
        speedup=options.speedup,
        model_name=options.model_name,
        stream_interval=options.stream_interval_ms / 1000.0,
        metrics=not options.no_metrics,
    )
    try:
        await announce(server.port)
    finally:
        await server.aclose()


def run(options: SimOptions) -> int:
    """Serve until SIGINT/SIGTERM (`backfill sim`; `options.py` builds `options`)."""
    run_loop(_main(options), uvloop=not options.no_uvloop)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m backfill.sim`: the options of `backfill sim` (`options.py`)."""
    from backfill.sim.options import main as sim_main

    return sim_main(argv)
