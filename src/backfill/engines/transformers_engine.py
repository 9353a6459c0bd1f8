"""`TransformersEngine`: in-process generation with transformers' continuous batching.

Serves `/v1/chat/completions` and `/v1/completions` from a local Hugging Face model folder (or a
hub id when the machine is online), and `/v1/responses` translated to and from chat
(`engines/responses.py`, `domain/responses_api.py`: text in, text out; tools refused). torch
and transformers are imported in `start()`, never at module import, so the core install does
not need them.

How a request runs:
- `send()` parses and checks the body on the event loop (pure functions below, no torch), renders
  the chat template, tokenizes, and checks the context length: a prompt that does not fit, or
  `prompt + max_tokens` beyond the context, answers 400 `context_length_exceeded` right away.
- It then hands `n` sequences to transformers' `ContinuousBatchingManager` (one background
  thread that owns the model: paged KV cache, requests join and leave the running batch every
  step) and awaits futures that the manager resolves through `register_result_handler`
  (`call_soon_threadsafe`). The event loop never runs model code, so the API stays responsive.
- Sampling is ours (`cb_sampling`): per-request temperature, top_p and seed, reproducible
  whatever else shares the batch. temperature 0 is greedy.
- `stop` strings: such requests are streamed token by token; once the decoded text contains a
  stop string the request is cancelled in the manager, the text cut before it, and
  finish_reason is `stop`. EOS tokens end a sequence with `stop`; reaching `max_tokens` gives
  `length`. Usage counts the prompt once and every generated token (an EOS token included).

Supported: `max_tokens` / `max_completion_tokens`, `temperature` (0..2), `top_p`, `seed`,
`stop` (up to 4 strings), `n` (1..`max_n`, default 16). Not supported (400
`unsupported_parameter`): `logprobs`, `best_of` > 1, `echo`, non-zero presence/frequency
penalties, `logit_bias`. Tools and response formats are ignored (passed to the chat template).

Options (`ModelConfig.options`): `default_temperature` and `default_top_p` (what a request that
gives none gets; default 1.0 as OpenAI's; a small model answers better cooler, as its model card
often says), `dtype` (default float32 on CPU, bfloat16 on GPU), `device`,
`max_model_len` (default: the model's `max_position_embeddings`), `max_n`, `page_size`,
`num_blocks`, `max_batch_tokens`, `max_requests_per_batch` (continuous-batching cache sizing;
transformers infers them from accelerator memory when unset; on a CPU the defaults are pages of
32 tokens and a 32k-token cache), `prefix_sharing` (default true).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from backfill.domain.responses_api import RESPONSES
from backfill.engines.base import EngineReply, error_reply
from backfill.engines.responses import responses_via_chat
from backfill.errors import EngineUnavailable, InvalidRequest
from backfill.settings import ModelConfig

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
DEFAULT_COMPLETIONS_MAX_TOKENS = 16  # the legacy completions API's default
MAX_STOP = 4
CPU_PAGE_SIZE = 32
CPU_CACHE_TOKENS = 32768


@dataclass(slots=True)
class Sampling:
    max_tokens: int | None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    n: int = 1


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{key!r} must be a number.", param=key, code="invalid_type")
    if not lo <= value <= hi:
        raise InvalidRequest(
            f"{key!r} must be between {lo:g} and {hi:g}.", param=key, code="invalid_value"
        )
    return float(value)


def _int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{key!r} must be an integer.", param=key, code="invalid_type")
    return value


def parse_sampling(
    body: dict[str, Any],
    endpoint: str,
    max_n: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> Sampling:
    """The sampling parameters of one request, checked (raises `InvalidRequest`);
    `temperature` and `top_p` are what a request that gives none gets."""
    for key in ("logprobs", "top_logprobs", "echo", "logit_bias"):
        if body.get(key) not in (None, False, 0, {}):
            raise InvalidRequest(
                f"{key!r} is not supported by this engine.", param=key, code="unsupported_parameter"
            )
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise InvalidRequest(
                f"{key!r} is not supported by this engine.", param=key, code="unsupported_parameter"
            )
    if body.get("best_of") not in (None, 1):
        raise InvalidRequest(
            "'best_of' is not supported by this engine.",
            param="best_of",
            code="unsupported_parameter",
        )
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, key)
    if max_tokens is not None and max_tokens < 1:
        raise InvalidRequest(f"{key!r} must be at least 1.", param=key, code="invalid_value")
    if max_tokens is None and endpoint == COMPLETIONS:
        max_tokens = DEFAULT_COMPLETIONS_MAX_TOKENS
    n = _int(body, "n")
    n = 1 if n is None else n
    if not 1 <= n <= max_n:
        raise InvalidRequest(f"'n' must be between 1 and {max_n}.", param="n", code="invalid_value")
    seed = _int(body, "seed")
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise InvalidRequest(
            "'stop' must be a string or a list of strings.", param="stop", code="invalid_type"
        )
    if len(stops) > MAX_STOP:
        raise InvalidRequest(
            f"'stop' takes at most {MAX_STOP} strings.", param="stop", code="invalid_value"
        )
    return Sampling(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", temperature, 0.0, 2.0),
        top_p=_number(body, "top_p", top_p, 0.0, 1.0) or 1.0,
        seed=seed,
        stop=[s for s in stops if s],
        n=n,
    )


def chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Messages for the chat template; content parts are joined into plain text."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest(
            "'messages' must be a non-empty list.", param="messages", code="invalid_type"
        )
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequest(
                f"messages[{i}] needs a 'role'.", param=f"messages[{i}]", code="invalid_type"
            )
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise InvalidRequest(
                        "Only text content parts are supported.",
                        param=f"messages[{i}].content",
                        code="unsupported_parameter",
                    )
                texts.append(str(part.get("text", "")))
            content = "".join(texts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise InvalidRequest(
                f"messages[{i}].content must be a string or a list of parts.",
                param=f"messages[{i}].content",
                code="invalid_type",
            )
        out.append({**m, "content": content})
    return out


def completion_prompts(body: dict[str, Any]) -> list[str | list[int]]:
    """`prompt` as a list of prompts (a string, token ids, or a list of either)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt):
            return [list(p) for p in prompt]
    raise InvalidRequest(
        "'prompt' must be a string, a list of strings, or token ids.",
        param="prompt",
        code="invalid_type",
    )


def context_error(prompt_tokens: int, max_tokens: int | None, context: int) -> str | None:
    """The OpenAI-style message when a request does not fit the context, else None."""
    if max_tokens is None:
        if prompt_tokens < context:
            return None
        return (
            f"This model's maximum context length is {context} tokens. However, your messages "
            f"resulted in {prompt_tokens} tokens. Please reduce the length of the messages."
        )
    if prompt_tokens + max_tokens <= context:
        return None
    return (
        f"This model's maximum context length is {context} tokens. However, you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in "
        "the completion). Please reduce the length of the messages or completion."
    )


def cut_at_stop(text: str, stops: list[str]) -> str | None:
    """`text` up to the earliest stop string, or None when none occurs."""
    cut = -1
    for s in stops:
        i = text.find(s)
        if i >= 0 and (cut < 0 or i < cut):
            cut = i
    return None if cut < 0 else text[:cut]


@dataclass(slots=True)
class Sequence:
    """One generated sequence (a choice) as it comes back from the manager."""

    tokens: list[int]
    text: str
    finish_reason: str


class TransformersEngine:
    """Generation in this process, on a transformers model with continuous batching."""

    def __init__(self, config: ModelConfig) -> None:
        if not config.path:
            raise ValueError(f"model {config.name!r}: the transformers engine needs a path")
        self.config = config
        self.model = config.name
        self.endpoints = frozenset(config.endpoints) & {CHAT, COMPLETIONS, RESPONSES}
        opts = config.options
        self.max_n = int(opts.get("max_n", 16))
        self.default_temperature = float(opts.get("default_temperature", 1.0))
        self.default_top_p = float(opts.get("default_top_p", 1.0))
        self._opts = opts
        self._manager: Any = None
        self._tokenizer: Any = None
        self._count_tokenizer: Any = None  # `count_tokens`'s own copy (see there)
        self._count_lock = threading.Lock()
        self._eos: list[int] = []
        self.context_length = 0
        self._counter = 0
        self._pending: dict[str, asyncio.Future[Any]] = {}

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._manager is not None:
            return
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        from backfill.engines import cb_sampling

        path = str(self.config.path)
        local = os.path.isdir(path)
        opts = self._opts
        device = opts.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype_name = opts.get("dtype") or ("bfloat16" if device.startswith("cuda") else "float32")
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=local, dtype=getattr(torch, dtype_name)
        ).to(device)
        model.eval()
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self._eos = [eos] if isinstance(eos, int) else [e for e in (eos or []) if e is not None]
        text_config = model.config.get_text_config()
        configured: Any = opts.get("max_model_len")
        native: Any = getattr(text_config, "max_position_embeddings", 2048)
        self.context_length = int(configured or native)
        gen = GenerationConfig(
            do_sample=False,
            max_new_tokens=self.context_length,
            eos_token_id=self._eos or -1,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        )
        cb_kwargs = {
            k: opts[k]
            for k in ("page_size", "num_blocks", "max_batch_tokens", "max_requests_per_batch")
            if k in opts
        }
        if not device.startswith("cuda"):
            # transformers sizes the paged cache from free accelerator memory; on a CPU that
            # gives a huge cache whose first step takes seconds. 32k tokens of small pages.
            cb_kwargs.setdefault("page_size", CPU_PAGE_SIZE)
            cb_kwargs.setdefault("num_blocks", CPU_CACHE_TOKENS // cb_kwargs["page_size"])
        cb = ContinuousBatchingConfig(
            use_async_batching=False,  # our sampler counts positions; keep steps in lock-step
            allow_block_sharing=bool(opts.get("prefix_sharing", True)),
            **cb_kwargs,
        )
        manager = model.init_continuous_batching(
            generation_config=gen, continuous_batching_config=cb
        )
        manager.logit_processor = cb_sampling.processors()
        manager.start()
        # one token through the whole path, so the first real request does not pay for setup
        manager.add_request([self._eos[0] if self._eos else 0], "warmup", max_new_tokens=1)
        manager.get_result("warmup", timeout=120)
        self._tokenizer = tokenizer
        self._manager = manager

    async def close(self) -> None:
        manager, self._manager = self._manager, None
        if manager is not None:
            for fut in self._pending.values():
                if not fut.done():
                    fut.cancel()
            await asyncio.to_thread(manager.stop, block=True, timeout=10)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(manager.destroy)

    # -- requests ------------------------------------------------------------------------------
    async def send(
        self,
        endpoint: str,
        body: dict[str, Any],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (the Engine protocol's per-request budget)
    ) -> EngineReply:
        if self._manager is None:
            raise RuntimeError("TransformersEngine.send() called before start()")
        if endpoint not in self.endpoints:
            return error_reply(404, f"{endpoint} is not served by {self.model!r}.")
        if endpoint == RESPONSES:
            return await responses_via_chat(lambda chat: self._run(CHAT, chat, timeout), body)
        return await self._run(endpoint, body, timeout)

    async def _run(
        self,
        endpoint: str,
        body: dict[str, Any],
        timeout: float | None,  # noqa: ASYNC109 (the per-request budget of `send`)
    ) -> EngineReply:
        try:
            sampling = parse_sampling(
                body,
                endpoint,
                self.max_n,
                temperature=self.default_temperature,
                top_p=self.default_top_p,
            )
            if endpoint == CHAT:
                prompts: list[list[int]] = [self._chat_ids(body)]
            else:
                prompts = [self._prompt_ids(p) for p in completion_prompts(body)]
            param = "messages" if endpoint == CHAT else "prompt"
            for ids in prompts:
                problem = context_error(len(ids), sampling.max_tokens, self.context_length)
                if problem is not None:
                    raise InvalidRequest(problem, param=param, code="context_length_exceeded")
        except InvalidRequest as exc:
            return error_reply(400, exc.message, exc.param, exc.code)

        seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
        jobs = [
            self._generate(ids, sampling, seed, stream=p * sampling.n + j)
            for p, ids in enumerate(prompts)
            for j in range(sampling.n)
        ]
        try:
            async with asyncio.timeout(timeout):
                sequences = await asyncio.gather(*jobs)
        except TimeoutError as exc:
            raise EngineUnavailable(
                f"model {self.model!r} did not finish within {timeout:g}s", code="request_timeout"
            ) from exc
        except RuntimeError as exc:  # the generation thread failed the request
            return error_reply(500, f"generation failed: {exc}", code="engine_error")
        prompt_tokens = sum(len(ids) for ids in prompts)
        completion_tokens = sum(len(s.tokens) for s in sequences)
        return EngineReply(
            200,
            orjson.dumps(self._body(endpoint, sequences, prompt_tokens, completion_tokens)),
        )

    def count_tokens(self, endpoint: str, body: dict[str, Any]) -> int | None:
        """The request's prompt tokens, as `send` will count them (chat template, each prompt
        of a completion); None before `start()` or for a body `send` would refuse. Responses
        requests are estimated: their conversion to chat happens in `send`."""
        if self._tokenizer is None or endpoint not in (CHAT, COMPLETIONS):
            return None
        # Counting runs on the validator's threads while `send` tokenizes on the event loop; a
        # fast tokenizer used from two threads at once fails ("Already borrowed"), so counting
        # has a copy of its own, one caller at a time.
        with self._count_lock:
            if self._count_tokenizer is None:
                self._count_tokenizer = copy.deepcopy(self._tokenizer)
            tokenizer = self._count_tokenizer
            try:
                if endpoint == CHAT:
                    return len(self._chat_ids(body, tokenizer))
                return sum(len(self._prompt_ids(p, tokenizer)) for p in completion_prompts(body))
            except InvalidRequest:
                return None

    def _chat_ids(self, body: dict[str, Any], tokenizer: Any = None) -> list[int]:
        tokenizer = self._tokenizer if tokenizer is None else tokenizer
        messages = chat_messages(body)
        extra: dict[str, Any] = {}
        if body.get("tools"):
            extra["tools"] = body["tools"]
        try:
            ids = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False, **extra
            )
        except Exception as exc:  # a template that rejects these messages (e.g. role order)
            raise InvalidRequest(
                f"chat template error: {exc}", param="messages", code="invalid_value"
            ) from exc
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    def _prompt_ids(self, prompt: str | list[int], tokenizer: Any = None) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        tokenizer = self._tokenizer if tokenizer is None else tokenizer
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return [int(t) for t in ids]

    async def _generate(self, ids: list[int], s: Sampling, seed: int, stream: int) -> Sequence:
        manager = self._manager
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Sequence] = loop.create_future()
        self._counter += 1
        request_id = f"{self.model}-{self._counter}"
        max_new = s.max_tokens if s.max_tokens is not None else self.context_length - len(ids)
        eos = set(self._eos)
        tokenizer = self._tokenizer
        stops = s.stop

        def finish(tokens: list[int]) -> Sequence:
            reason = "stop" if tokens and tokens[-1] in eos else "length"
            if len(tokens) < max_new and reason == "length":
                reason = "stop"
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            if stops:
                cut = cut_at_stop(text, stops)
                if cut is not None:
                    return Sequence(tokens, cut, "stop")
            return Sequence(tokens, text, reason)

        def on_result(out: Any) -> None:
            if future.done():
                return
            if out.error is not None:
                future.set_exception(RuntimeError(str(out.error)))
                return
            tokens = list(out.generated_tokens)
            if out.is_finished():
                future.set_result(finish(tokens))
            elif stops:
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                cut = cut_at_stop(text, stops)
                if cut is not None:
                    future.set_result(Sequence(tokens, cut, "stop"))
                    manager.cancel_request(request_id)

        manager.register_result_handler(request_id, on_result)
        self._pending[request_id] = future
        kwargs: dict[str, Any] = {"seed": seed, "stream": stream}
        if s.temperature != 1.0:
            kwargs["temperature"] = float(s.temperature)
        if s.top_p < 1.0:
            kwargs["top_p"] = float(s.top_p)
        try:
            manager.add_request(
                ids,
                request_id=request_id,
                max_new_tokens=max_new,
                streaming=bool(stops),
                eos_token_id=self._eos or -1,
                **kwargs,
            )
            return await future
        except BaseException:
            if not future.done():
                manager.cancel_request(request_id)
            raise
        finally:
            self._pending.pop(request_id, None)
            with manager.output_router._lock:
                manager.output_router.result_handlers.pop(request_id, None)

    def _body(
        self, endpoint: str, seqs: list[Sequence], prompt_tokens: int, completion_tokens: int
    ) -> dict[str, Any]:
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        created = int(time.time())
        if endpoint == CHAT:
            return {
                "id": "chatcmpl-" + secrets.token_hex(12),
                "object": "chat.completion",
                "created": created,
                "model": self.model,
                "choices": [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": s.text, "refusal": None},
                        "logprobs": None,
                        "finish_reason": s.finish_reason,
                    }
                    for i, s in enumerate(seqs)
                ],
                "usage": usage,
                "system_fingerprint": None,
            }
        return {
            "id": "cmpl-" + secrets.token_hex(12),
            "object": "text_completion",
            "created": created,
            "model": self.model,
            "choices": [
                {"text": s.text, "index": i, "logprobs": None, "finish_reason": s.finish_reason}
                for i, s in enumerate(seqs)
            ],
            "usage": usage,
            "system_fingerprint": None,
        }
