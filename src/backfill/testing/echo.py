"""The echo application behind `backfill.testing.upstream`: one request in, one `Answer` out.

`handle` routes a parsed request (method, path, Authorization, body) to the echo answers, counts
it in the shared `UpstreamState`, and reads the scripted-failure directives in its text. No I/O:
delays and dropped connections are fields of the `Answer` that the connection carries out. The
endpoints and the directives are listed in `backfill.testing.upstream`'s module doc.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from backfill.domain.responses_api import chat_to_response, request_to_chat
from backfill.errors import InvalidRequest
from backfill.testing.httpserver import DONE, error_body, event

__all__ = ["Answer", "UpstreamState", "error", "handle"]

_DIRECTIVE = re.compile(
    r"#(fail400|fail500|fail429|sleep|close|html|empty|truncated|array|deep)"
    r"(?::(\d+))?(?::(\d+(?:\.\d+)?))?"
)
#: 200 answers whose body is not a usable JSON object (`#html:N` and friends)
_BAD_BODIES = {
    "html": (b"<html><body>502 Bad Gateway</body></html>", b"text/html"),
    "empty": (b"", b"application/json"),
    "truncated": (b'{"id": "chatcmpl-1", "choices": [{"message": {"con', b"application/json"),
    "array": (b'[{"id": "chatcmpl-1"}]', b"application/json"),
}
_MODELS_PATH = b"/v1/models"
_POST_PATHS = (
    b"/chat/completions",
    b"/completions",
    b"/embeddings",
    b"/responses",
    b"/moderations",
)
#: the moderation categories of OpenAI's `Moderation` object (omni-moderation's set)
MODERATION_CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/instructions",
    "self-harm/intent",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)


@dataclass
class UpstreamState:
    """Shared by all connections of one server: options, counters, scripted-failure memory."""

    api_key: str | None = None
    latency: float = 0.0  # seconds added to every POST answer
    requests: int = 0
    by_text: dict[str, int] = field(default_factory=dict)
    next_id: int = 0  # completion ids
    answered: int = 0  # x-request-id values
    last_priority: Any = None  # `priority` of the last completion request
    _auth: bytes | None = None

    def __post_init__(self) -> None:
        self._auth = None if self.api_key is None else b"Bearer " + self.api_key.encode()

    def reset(self) -> None:
        self.requests = 0
        self.by_text.clear()
        self.last_priority = None


@dataclass(slots=True)
class Answer:
    status: int
    body: bytes
    headers: bytes = b""  # extra header lines, each ending in CRLF
    delay: float = 0.0
    drop: bool = False
    content_type: bytes = b"application/json"


def error(status: int, message: str, type_: str, param: str | None, code: str | None) -> Answer:
    return Answer(status, error_body(message, type_, param, code))


def _text_of(content: Any) -> str:
    """Text of a message content: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and "text" in p
        )
    return "" if content is None else str(content)


def _words(text: str) -> int:
    return len(text.split())


def _embedding(text: str) -> list[float]:
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return [round(b / 127.5 - 1.0, 6) for b in digest]


def handle(
    state: UpstreamState, method: bytes, path: bytes, auth: bytes | None, body: bytes
) -> Answer:
    """The whole application: one request in, one `Answer` out. No I/O."""
    if b"?" in path:
        path = path.split(b"?", 1)[0]
    if method == b"GET":
        if path == b"/stats":
            stats = {
                "requests": state.requests,
                "by_text": state.by_text,
                "last_priority": state.last_priority,
            }
            return Answer(200, orjson.dumps(stats))
        if path == b"/health":
            return Answer(200, b"{}")
        if path == _MODELS_PATH or path == b"/models":
            if state._auth is not None and auth != state._auth:
                return _unauthorized()
            model = {"id": "echo", "object": "model", "created": 0, "owned_by": "backfill"}
            return Answer(200, orjson.dumps({"object": "list", "data": [model]}))
        return _not_found(path)
    if method != b"POST":
        return error(405, "Method not allowed", "invalid_request_error", None, None)
    if path == b"/reset":
        state.reset()
        return Answer(200, b"{}")
    if path.startswith(b"/v1/"):
        path = path[3:]
    if path not in _POST_PATHS:
        return _not_found(path)
    state.requests += 1
    if state._auth is not None and auth != state._auth:
        return _unauthorized()
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        return error(
            400,
            "We could not parse the JSON body of your request.",
            "invalid_request_error",
            None,
            None,
        )
    if not isinstance(request, dict):
        return error(
            400, "The request body must be a JSON object.", "invalid_request_error", None, None
        )
    if path not in (b"/embeddings", b"/moderations"):
        state.last_priority = request.get("priority")
    try:
        if path == b"/chat/completions":
            return _chat(state, request)
        if path == b"/completions":
            return _completion(state, request)
        if path == b"/responses":
            return _responses(state, request)
        if path == b"/moderations":
            return _moderations(state, request)
        return _embeddings(state, request)
    except (KeyError, TypeError, AttributeError, IndexError) as exc:
        return error(400, f"Invalid request: {exc!r}", "invalid_request_error", None, None)


def _not_found(path: bytes) -> Answer:
    message = f"Unknown path {path.decode(errors='replace')}"
    return error(404, message, "invalid_request_error", None, "not_found")


def _unauthorized() -> Answer:
    return error(
        401, "Incorrect API key provided.", "invalid_request_error", None, "invalid_api_key"
    )


def _script(state: UpstreamState, text: str) -> tuple[Answer | None, float]:
    """Count `text` and read its directives: (a failure to send instead, delay in seconds)."""
    seen = state.by_text.get(text, 0) + 1
    state.by_text[text] = seen
    delay = state.latency
    if "#" not in text:
        return None, delay
    failure: Answer | None = None
    for name, count, extra in _DIRECTIVE.findall(text):
        times = int(count) if count else None
        if name == "sleep":
            delay += (times or 0) / 1000.0
        elif name == "close":
            failure = Answer(0, b"", drop=True)
        elif name == "fail400":
            failure = error(
                400,
                "This model's maximum context length is 8 tokens (scripted #fail400).",
                "invalid_request_error",
                "messages",
                "context_length_exceeded",
            )
        elif name == "fail500" and (times is None or seen <= times):
            failure = error(
                500, "The server had an error (scripted #fail500).", "server_error", None, None
            )
        elif name in _BAD_BODIES and (times is None or seen <= times):
            body, content_type = _BAD_BODIES[name]
            failure = Answer(200, body, content_type=content_type)
        elif name == "fail429" and (times is None or seen <= times):
            failure = error(
                429,
                "Rate limit reached (scripted #fail429).",
                "rate_limit_error",
                None,
                "rate_limit_exceeded",
            )
            failure.headers = b"Retry-After: " + (extra or "0").encode() + b"\r\n"
    if failure is not None:
        failure.delay = delay
    return failure, delay


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _chat(state: UpstreamState, request: dict[str, Any]) -> Answer:
    messages = request["messages"]
    if not isinstance(messages, list) or not messages:
        return error(
            400, "'messages' must be a non-empty list.", "invalid_request_error", "messages", None
        )
    texts = [_text_of(m.get("content")) for m in messages]
    last = texts[-1]
    failure, delay = _script(state, last)
    if failure is not None:
        return failure
    reply = "echo: " + last
    state.next_id += 1
    usage = _usage(sum(_words(t) for t in texts), _words(reply))
    if request.get("stream") is True:
        return _sse(f"chatcmpl-{state.next_id}", request, reply, usage, chat=True, delay=delay)
    deep = re.search(r"#deep:(\d+)", last)
    payload = {
        "id": f"chatcmpl-{state.next_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": usage,
    }
    if deep is not None:
        # nested deeper than orjson writes (254): spliced in by hand, pretty-printed too
        levels = int(deep.group(1))
        nested = b'{\n "a":' * levels + b"{}" + b"}" * levels
        return Answer(
            200, orjson.dumps(payload)[:-1] + b',\n"nested": ' + nested + b"}", delay=delay
        )
    return Answer(200, orjson.dumps(payload), delay=delay)


def _completion(state: UpstreamState, request: dict[str, Any]) -> Answer:
    prompt = request["prompt"]
    text = prompt if isinstance(prompt, str) else " ".join(str(p) for p in prompt)
    failure, delay = _script(state, text)
    if failure is not None:
        return failure
    reply = "echo: " + text
    state.next_id += 1
    usage = _usage(_words(text), _words(reply))
    if request.get("stream") is True:
        return _sse(f"cmpl-{state.next_id}", request, reply, usage, chat=False, delay=delay)
    payload = {
        "id": f"cmpl-{state.next_id}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": request.get("model"),
        "choices": [{"index": 0, "text": reply, "logprobs": None, "finish_reason": "stop"}],
        "usage": usage,
    }
    return Answer(200, orjson.dumps(payload), delay=delay)


def _sse(
    id_: str,
    request: dict[str, Any],
    reply: str,
    usage: dict[str, int],
    *,
    chat: bool,
    delay: float,
) -> Answer:
    """The echo as Server-Sent Events: one word per chunk."""
    head = {"id": id_, "created": int(time.time()), "model": request.get("model")}
    events: list[dict[str, Any]] = []
    words = reply.split(" ")
    for i, word in enumerate(words):
        text = word if i == 0 else " " + word
        last = i == len(words) - 1
        finish = "stop" if last else None
        if chat:
            delta: dict[str, Any] = {"content": text}
            if i == 0:
                delta["role"] = "assistant"
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            events.append({**head, "object": "chat.completion.chunk", "choices": [choice]})
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            events.append({**head, "object": "text_completion", "choices": [choice]})
    options = request.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        kind = "chat.completion.chunk" if chat else "text_completion"
        events.append({**head, "object": kind, "choices": [], "usage": usage})
    body = b"".join(event(orjson.dumps(e)) for e in events) + DONE
    return Answer(200, body, delay=delay, content_type=b"text/event-stream")


def _embeddings(state: UpstreamState, request: dict[str, Any]) -> Answer:
    raw = request["input"]
    inputs = [raw] if isinstance(raw, str) else [i if isinstance(i, str) else str(i) for i in raw]
    failure, delay = _script(state, raw if isinstance(raw, str) else " ".join(inputs))
    if failure is not None:
        return failure
    words = sum(_words(t) for t in inputs)
    payload = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _embedding(t)}
            for i, t in enumerate(inputs)
        ],
        "model": request.get("model"),
        "usage": {"prompt_tokens": words, "total_tokens": words},
    }
    return Answer(200, orjson.dumps(payload), delay=delay)


def _responses(state: UpstreamState, request: dict[str, Any]) -> Answer:
    """`/v1/responses`: the chat echo of the translated request, as a `Response` object (the
    translation is `backfill.domain.responses_api`, which the in-process engines use too)."""
    if request.get("stream") is True:
        return error(
            400,
            "The echo upstream does not stream /v1/responses.",
            "invalid_request_error",
            "stream",
            "unsupported_parameter",
        )
    try:
        chat = request_to_chat(request)
    except InvalidRequest as exc:
        return error(400, exc.message, "invalid_request_error", exc.param, exc.code)
    answer = _chat(state, chat)
    if answer.status != 200 or answer.drop or answer.content_type != b"application/json":
        return answer
    try:
        body = orjson.loads(answer.body)
    except orjson.JSONDecodeError:
        return answer
    if not isinstance(body, dict):
        return answer
    response_id = "resp_echo" + str(state.next_id)
    answer.body = orjson.dumps(chat_to_response(request, body, response_id=response_id))
    return answer


def _moderations(state: UpstreamState, request: dict[str, Any]) -> Answer:
    """`/v1/moderations`: one result per input (a string, a list of strings, or a list of
    `text` / `image_url` parts); an input containing `#flag` is flagged as violence. The
    scores are a hash of the text, so the same input always gets the same result."""
    raw = request["input"]
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        return error(400, "'input' must not be empty.", "invalid_request_error", "input", None)
    texts: list[tuple[str, str]] = []  # (text, input type)
    for item in items:
        if isinstance(item, str):
            texts.append((item, "text"))
        elif isinstance(item, dict) and item.get("type") == "text":
            texts.append((str(item["text"]), "text"))
        elif isinstance(item, dict) and item.get("type") == "image_url":
            texts.append((str(item["image_url"].get("url", "")), "image"))
        else:
            return error(400, "Invalid moderation input.", "invalid_request_error", "input", None)
    failure, delay = _script(state, " ".join(t for t, _ in texts))
    if failure is not None:
        return failure
    state.next_id += 1
    results = []
    for text, kind in texts:
        flagged = "#flag" in text
        scores = _embedding(text)
        results.append(
            {
                "flagged": flagged,
                "categories": {c: flagged and c == "violence" for c in MODERATION_CATEGORIES},
                "category_scores": {
                    c: 0.99 if flagged and c == "violence" else round(abs(scores[i % 8]) / 100, 6)
                    for i, c in enumerate(MODERATION_CATEGORIES)
                },
                "category_applied_input_types": {c: [kind] for c in MODERATION_CATEGORIES},
            }
        )
    payload = {
        "id": f"modr-{state.next_id}",
        "model": request.get("model") or "omni-moderation-latest",
        "results": results,
    }
    return Answer(200, orjson.dumps(payload), delay=delay)
