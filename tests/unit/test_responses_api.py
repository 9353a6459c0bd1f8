"""`/v1/responses` served from chat: the pure translation (`domain/responses_api.py`), its
async glue for in-process engines (`engines/responses.py`) and the echo upstream's answers."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from openai.types import ModerationCreateResponse
from openai.types.responses import Response

from backfill.domain.responses_api import chat_to_response, input_messages, request_to_chat
from backfill.engines.base import EngineReply, error_reply
from backfill.engines.responses import responses_via_chat
from backfill.errors import InvalidRequest
from backfill.testing.echo import UpstreamState, handle


def chat_answer(text: str, finish: str = "stop", **usage: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "tiny",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
            }
        ],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10, **usage},
    }


def test_string_input_is_one_user_message() -> None:
    chat = request_to_chat({"model": "tiny", "input": "Hello"})
    assert chat == {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}]}


def test_message_list_with_text_parts_and_instructions() -> None:
    body = {
        "model": "tiny",
        "instructions": "Be brief.",
        "input": [
            {"role": "developer", "content": "Answer in French."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
            {"role": "assistant", "content": [{"type": "output_text", "text": "Salut"}]},
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "a"},
                    {"type": "input_text", "text": "b"},
                ],
            },
        ],
        "max_output_tokens": 20,
        "temperature": 0.5,
        "top_p": 0.9,
        "stop": ["\n"],
        "seed": 3,
        "metadata": {"k": "v"},
        "store": False,
    }
    chat = request_to_chat(body)
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Salut"},
        {"role": "user", "content": "ab"},
    ]
    assert chat["max_completion_tokens"] == 20
    assert (chat["temperature"], chat["top_p"], chat["stop"], chat["seed"]) == (0.5, 0.9, ["\n"], 3)
    assert "metadata" not in chat and "store" not in chat and "input" not in chat


def test_completed_response_object() -> None:
    request = {
        "model": "tiny",
        "input": "Hello",
        "instructions": "Be brief.",
        "metadata": {"a": "1"},
    }
    out = chat_to_response(
        request, chat_answer("Hi there", prompt_tokens_details={"cached_tokens": 2})
    )
    parsed = Response.model_validate(out)  # the official SDK's model of the object
    assert parsed.object == "response" and parsed.id.startswith("resp_")
    assert parsed.status == "completed" and parsed.incomplete_details is None
    assert parsed.output_text == "Hi there"
    assert out["output"][0]["type"] == "message" and out["output"][0]["role"] == "assistant"
    assert out["output"][0]["content"][0]["type"] == "output_text"
    assert (out["created_at"], out["model"], out["instructions"]) == (
        1_700_000_000,
        "tiny",
        "Be brief.",
    )
    assert out["metadata"] == {"a": "1"}
    assert out["usage"] == {
        "input_tokens": 7,
        "input_tokens_details": {"cached_tokens": 2, "cache_write_tokens": 0},
        "output_tokens": 3,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 10,
    }


def test_length_is_incomplete_for_max_output_tokens() -> None:
    out = chat_to_response(
        {"model": "tiny", "input": "x", "max_output_tokens": 3}, chat_answer("a b c", "length")
    )
    assert out["status"] == "incomplete"
    assert out["incomplete_details"] == {"reason": "max_output_tokens"}
    assert out["output"][0]["status"] == "incomplete"
    assert out["max_output_tokens"] == 3
    assert Response.model_validate(out).incomplete_details is not None


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        (
            {"tools": [{"type": "function", "name": "f", "parameters": {}}]},
            "tools",
            "unsupported_parameter",
        ),
        ({"tool_choice": "required"}, "tool_choice", "unsupported_parameter"),
        ({"previous_response_id": "resp_1"}, "previous_response_id", "unsupported_parameter"),
        ({"text": {"format": {"type": "json_object"}}}, "text", "unsupported_parameter"),
        ({"reasoning": {"effort": "high"}}, "reasoning", "unsupported_parameter"),
        ({"frequency_penalty": 1}, "frequency_penalty", "unknown_parameter"),
        ({"max_output_tokens": 0}, "max_output_tokens", "invalid_value"),
    ],
)
def test_what_cannot_be_served_is_refused(extra: dict[str, Any], param: str, code: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        request_to_chat({"model": "tiny", "input": "x", **extra})
    assert (info.value.param, info.value.code) == (param, code)
    assert info.value.message


@pytest.mark.parametrize(
    ("value", "param", "code"),
    [
        (None, "input", "missing_required_parameter"),
        ([], "input", "invalid_type"),
        (3, "input", "invalid_type"),
        (
            [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}],
            "input[0].content[0]",
            "unsupported_input",
        ),
        (
            [{"type": "function_call_output", "call_id": "c", "output": "1"}],
            "input[0]",
            "unsupported_input",
        ),
        ([{"role": "tool", "content": "x"}], "input[0].role", "invalid_value"),
        (["x"], "input[0]", "invalid_type"),
    ],
)
def test_bad_or_non_text_input_is_refused(value: Any, param: str, code: str) -> None:
    body = {"model": "tiny"} if value is None else {"model": "tiny", "input": value}
    with pytest.raises(InvalidRequest) as info:
        input_messages(body)
    assert (info.value.param, info.value.code) == (param, code)


def test_engine_glue_answers_a_response_and_renames_error_params() -> None:
    sent: list[dict[str, Any]] = []

    async def chat(body: dict[str, Any]) -> EngineReply:
        sent.append(body)
        if body["messages"][-1]["content"] == "long":
            return error_reply(400, "too long", "messages", "context_length_exceeded")
        return EngineReply(200, orjson.dumps(chat_answer("ok")), request_id="r1")

    ok = asyncio.run(responses_via_chat(chat, {"model": "tiny", "input": "hi"}))
    assert ok.status == 200 and ok.request_id == "r1"
    assert orjson.loads(ok.body)["object"] == "response"
    assert sent[0]["messages"] == [{"role": "user", "content": "hi"}]

    long = asyncio.run(responses_via_chat(chat, {"model": "tiny", "input": "long"}))
    error = orjson.loads(long.body)["error"]
    assert long.status == 400 and (error["param"], error["code"]) == (
        "input",
        "context_length_exceeded",
    )

    refused = asyncio.run(responses_via_chat(chat, {"model": "tiny", "input": "x", "tools": [{}]}))
    assert refused.status == 400 and len(sent) == 2  # never sent to the engine
    assert orjson.loads(refused.body)["error"]["param"] == "tools"


def test_echo_upstream_serves_responses_and_moderations() -> None:
    state = UpstreamState()
    body = orjson.dumps({"model": "m", "input": [{"role": "user", "content": "one two"}]})
    answer = handle(state, b"POST", b"/v1/responses", None, body)
    out = Response.model_validate(orjson.loads(answer.body))
    assert answer.status == 200 and out.output_text == "echo: one two"
    assert out.usage is not None and (out.usage.input_tokens, out.usage.output_tokens) == (2, 3)

    tools = orjson.dumps({"model": "m", "input": "x", "tools": [{"type": "web_search"}]})
    assert handle(state, b"POST", b"/v1/responses", None, tools).status == 400

    mod = orjson.dumps({"model": "mod", "input": ["fine", "bad #flag"]})
    answer = handle(state, b"POST", b"/v1/moderations", None, mod)
    parsed = ModerationCreateResponse.model_validate(orjson.loads(answer.body))
    assert answer.status == 200 and parsed.model == "mod"
    assert [r.flagged for r in parsed.results] == [False, True]
    assert parsed.results[1].categories.violence is True
