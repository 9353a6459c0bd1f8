"""`/v1/responses` for an engine that generates chat completions: the async glue around the
pure translation in `backfill.domain.responses_api`.

An in-process engine that serves chat calls `responses_via_chat(self._chat, body)` for a
Responses request: the body is translated (a 400 in the OpenAI error shape for what cannot be
served), sent as a chat request, and a 2xx chat answer comes back as a `Response` object. Error
answers of the chat request pass through, their `param` renamed to the Responses parameter it
came from (`messages` -> `input`, `max_completion_tokens` -> `max_output_tokens`). Upstreams of
kind `openai` do not use this: they get `/v1/responses` as sent.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from backfill.domain.responses_api import chat_to_response, request_to_chat
from backfill.engines.base import EngineReply, error_reply
from backfill.errors import InvalidRequest

ChatSender = Callable[[dict[str, Any]], Awaitable[EngineReply]]

_PARAMS = {
    "messages": "input",
    "max_completion_tokens": "max_output_tokens",
    "max_tokens": "max_output_tokens",
}


async def responses_via_chat(send_chat: ChatSender, body: dict[str, Any]) -> EngineReply:
    """Answer the Responses request `body` with `send_chat` (one chat completions request)."""
    try:
        chat_body = request_to_chat(body)
    except InvalidRequest as exc:
        return error_reply(400, exc.message, exc.param, exc.code)
    reply = await send_chat(chat_body)
    try:
        answer = orjson.loads(reply.body)
    except orjson.JSONDecodeError:
        return reply
    if not isinstance(answer, dict):
        return reply
    if 200 <= reply.status < 300:
        out = chat_to_response(body, answer)
    else:
        error = answer.get("error")
        if not isinstance(error, dict) or error.get("param") not in _PARAMS:
            return reply
        out = {**answer, "error": {**error, "param": _PARAMS[error["param"]]}}
    return EngineReply(reply.status, orjson.dumps(out), reply.retry_after, reply.request_id)
