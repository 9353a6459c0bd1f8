"""The Responses API (`/v1/responses`) served from chat completions, as pure translation.

An engine that generates chat completions can answer a Responses request that asks for nothing
more than text in, text out: `request_to_chat` turns the Responses body into a chat body and
`chat_to_response` turns the chat answer back into a Responses `Response` object. Upstreams of
kind `openai` never go through here (they get the request as sent); the in-process
`transformers` engine, the simulator (`backfill sim`) and the test echo upstream do.

Why one module in `domain/`: the translation has no I/O and three users in different layers
(an engine, and the two tools in `sim/` and `testing/`), which may all import `domain/` but not
each other's engines. The per-line batch validation (`domain/validation.py`) checks the same
body's required `input` before a batch starts.

What is served (the rest is refused with a 400 in the OpenAI error shape, `InvalidRequest`,
rather than silently dropped, since an answer that ignored it would be wrong):
- `input`: a string (one user message), or a list of message items: `{"role", "content"}`
  with an optional `"type": "message"`; `content` a string or a list of `input_text` /
  `output_text` parts (an earlier assistant turn). `developer` messages become `system` ones,
  which chat templates know.
- `instructions`: a system message ahead of the input.
- `max_output_tokens` -> `max_completion_tokens`; `temperature`, `top_p`; the extensions
  `stop` and `seed` that vLLM's Responses server also takes; vLLM's `priority`.
- Accepted and only echoed or ignored: `metadata`, `store` (a batch stores nothing anyway),
  `user`, `safety_identifier`, `prompt_cache_key`, `service_tier`, `truncation`,
  `parallel_tool_calls`, `tool_choice` "auto"/"none", empty `tools`/`include`, a `text`
  format of type `text`, `reasoning` without an effort or summary, `max_tool_calls`.
- Refused: tools, non-text input (images, files, audio) and non-message items (function calls
  and their outputs, item references), `previous_response_id` and `conversation` (no state is
  kept), structured output formats, reasoning settings, logprobs, `background`, `prompt`
  templates, and any parameter the Responses API does not have (as OpenAI: `Unknown parameter`).

The answer: a `message` output item with one `output_text` part; `status` is `completed`, or
`incomplete` with `incomplete_details.reason` `max_output_tokens` when the chat answer stopped
for length (`content_filter` likewise). Usage is renamed: prompt -> input, completion ->
output, with their cached/reasoning details.
"""

from __future__ import annotations

import secrets
from typing import Any

from backfill.errors import InvalidRequest

RESPONSES = "/v1/responses"
CHAT = "/v1/chat/completions"

#: parameters passed on to the chat body under the same name
_SAMPLING = ("temperature", "top_p", "stop", "seed", "priority")
#: parameters accepted and echoed or ignored (they change nothing about the text produced)
_IGNORED = frozenset(
    {
        "model",
        "input",
        "instructions",
        "max_output_tokens",
        "metadata",
        "store",
        "stream",  # a batch line with stream: true is refused by validation before this
        "user",
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_retention",
        "service_tier",
        "truncation",
        "parallel_tool_calls",
        "tool_choice",
        "tools",
        "include",
        "text",
        "reasoning",
        "max_tool_calls",
        "top_logprobs",
        "background",
        "previous_response_id",
        "conversation",
        "prompt",
        *_SAMPLING,
    }
)
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})


def _refuse(message: str, param: str, code: str = "unsupported_parameter") -> InvalidRequest:
    return InvalidRequest(message, param=param, code=code)


def _check_served(body: dict[str, Any]) -> None:
    """Raise for the first parameter this translation cannot honour."""
    for key in body:
        if key not in _IGNORED:
            raise _refuse(f"Unknown parameter: '{key}'.", key, "unknown_parameter")
    if body.get("tools"):
        raise _refuse("Tools are not supported by this model (text in, text out only).", "tools")
    if body.get("tool_choice") not in (None, "auto", "none"):
        raise _refuse(
            "'tool_choice' needs tools, which this model does not support.", "tool_choice"
        )
    if body.get("include"):
        raise _refuse("'include' is not supported by this model.", "include")
    for key in ("previous_response_id", "conversation"):
        if body.get(key) is not None:
            raise _refuse(
                f"'{key}' is not supported here: no response is stored; send the whole "
                "conversation in 'input'.",
                key,
            )
    if body.get("background") is True:
        raise _refuse("'background' is not supported in a batch.", "background")
    if body.get("prompt") is not None:
        raise _refuse("Prompt templates ('prompt') are not supported by this model.", "prompt")
    if body.get("top_logprobs") not in (None, 0):
        raise _refuse("'top_logprobs' is not supported by this model.", "top_logprobs")
    text = body.get("text")
    if text is not None:
        fmt = text.get("format") if isinstance(text, dict) else text
        if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
            raise _refuse("Only the 'text' output format is supported by this model.", "text")
    reasoning = body.get("reasoning")
    if reasoning is not None and (
        not isinstance(reasoning, dict) or any(v is not None for v in reasoning.values())
    ):
        raise _refuse("Reasoning settings are not supported by this model.", "reasoning")


def _text_of(content: Any, param: str) -> str:
    """The text of a message's `content`: a string or a list of text parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(
            f"'{param}' must be a string or a list of content parts.",
            param=param,
            code="invalid_type",
        )
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise _refuse(
                f"Only text input is supported by this model; {param}[{j}] is "
                f"{kind if isinstance(kind, str) else 'not a text part'}.",
                f"{param}[{j}]",
                "unsupported_input",
            )
        texts.append(part["text"])
    return "".join(texts)


def input_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """`instructions` and `input` as chat messages (raises `InvalidRequest`)."""
    messages: list[dict[str, str]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise InvalidRequest(
                "'instructions' must be a string.", param="instructions", code="invalid_type"
            )
        messages.append({"role": "system", "content": instructions})
    value = body.get("input")
    if value is None:
        raise InvalidRequest(
            "Missing required parameter: 'input'.",
            param="input",
            code="missing_required_parameter",
        )
    if isinstance(value, str):
        messages.append({"role": "user", "content": value})
        return messages
    if not isinstance(value, list) or not value:
        raise InvalidRequest(
            "'input' must be a string or a non-empty list of input items.",
            param="input",
            code="invalid_type",
        )
    for i, item in enumerate(value):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"'{param}' must be an object.", param=param, code="invalid_type")
        kind = item.get("type", "message")
        if kind != "message":
            raise _refuse(
                f"Only message input items are supported by this model; {param} is {kind!r}.",
                param,
                "unsupported_input",
            )
        role = item.get("role")
        role = _ROLES.get(role) if isinstance(role, str) else None
        if role is None:
            raise InvalidRequest(
                f"'{param}.role' must be one of 'user', 'assistant', 'system', 'developer'.",
                param=f"{param}.role",
                code="invalid_value",
            )
        messages.append(
            {"role": role, "content": _text_of(item.get("content"), f"{param}.content")}
        )
    return messages


def request_to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """The chat completions body that answers the Responses request `body`.

    Raises `InvalidRequest` (400, with param and code) for what cannot be served."""
    _check_served(body)
    chat: dict[str, Any] = {"model": body.get("model"), "messages": input_messages(body)}
    limit = body.get("max_output_tokens")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidRequest(
                "'max_output_tokens' must be a positive integer.",
                param="max_output_tokens",
                code="invalid_value",
            )
        chat["max_completion_tokens"] = limit
    for key in _SAMPLING:
        if body.get(key) is not None:
            chat[key] = body[key]
    return chat


def _usage(chat_usage: Any) -> dict[str, Any]:
    u = chat_usage if isinstance(chat_usage, dict) else {}
    prompt = int(u.get("prompt_tokens") or 0)
    completion = int(u.get("completion_tokens") or 0)
    in_det = u.get("prompt_tokens_details")
    out_det = u.get("completion_tokens_details")
    cached = in_det.get("cached_tokens") if isinstance(in_det, dict) else None
    reasoning = out_det.get("reasoning_tokens") if isinstance(out_det, dict) else None
    return {
        "input_tokens": prompt,
        # the spec's details require `cache_write_tokens` too: nothing here writes a cache
        # that is billed apart, so 0
        "input_tokens_details": {"cached_tokens": int(cached or 0), "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": int(reasoning or 0)},
        "total_tokens": int(u.get("total_tokens") or prompt + completion),
    }


_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def chat_to_response(
    request: dict[str, Any], chat: dict[str, Any], *, response_id: str | None = None
) -> dict[str, Any]:
    """The Responses `Response` object for the Responses `request` answered by the chat
    completion `chat` (a 200 body). `response_id` defaults to a new random `resp_...`."""
    choices = chat.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else {}
    message = choice.get("message") if isinstance(choice, dict) else None
    text = message.get("content") if isinstance(message, dict) else None
    finish = choice.get("finish_reason") if isinstance(choice, dict) else None
    reason = _INCOMPLETE.get(finish) if isinstance(finish, str) else None
    status = "completed" if reason is None else "incomplete"
    rid = response_id or "resp_" + secrets.token_hex(24)
    metadata = request.get("metadata")
    return {
        "id": rid,
        "object": "response",
        "created_at": int(chat.get("created") or 0),
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": None if reason is None else {"reason": reason},
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "max_tool_calls": request.get("max_tool_calls"),
        "model": chat.get("model") or request.get("model"),
        "output": [
            {
                "id": "msg_" + rid.removeprefix("resp_"),
                "type": "message",
                "status": status,
                "role": "assistant",
                "content": [
                    {
                        "type": "output_text",
                        "text": text if isinstance(text, str) else "",
                        "annotations": [],
                        "logprobs": [],
                    }
                ],
            }
        ],
        "parallel_tool_calls": request.get("parallel_tool_calls", True),
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": False,
        "temperature": request.get("temperature"),
        "text": {"format": {"type": "text"}},
        "tool_choice": request.get("tool_choice", "auto"),
        "tools": [],
        "top_p": request.get("top_p"),
        "truncation": request.get("truncation", "disabled"),
        "usage": _usage(chat.get("usage")),
        "user": request.get("user"),
        "metadata": metadata if isinstance(metadata, dict) else {},
    }
