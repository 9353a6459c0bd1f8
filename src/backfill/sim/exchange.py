"""One completion request in flight on a simulator connection: its answer in OpenAI's format.

`Exchange` writes the answer once the engine has produced it, as one JSON body or as SSE chunks
(role chunk, content chunks, a last chunk with `finish_reason`, the usage chunk, `[DONE]`),
each final answer with the `"sim"` extension object of simulated latencies. The formats and the
flush policy are described in `backfill.sim.server`'s module doc.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import orjson

from backfill.domain.responses_api import chat_to_response
from backfill.sim.engine import SimRequest
from backfill.sim.tokens import output_text
from backfill.testing.httpserver import DONE, LAST_CHUNK, Reply, chunk, event, response, stream_head

if TYPE_CHECKING:
    from backfill.sim.server import SimServer

__all__ = ["Exchange"]


class Exchange:
    """One completion request in flight on a connection, from parse to its last byte."""

    __slots__ = (
        "chat",
        "created",
        "dirty",
        "done",
        "head",
        "include_usage",
        "reply",
        "request",
        "response_id",
        "responses",
        "sent",
        "server",
        "started",
        "stream",
    )

    def __init__(
        self,
        reply: Reply,
        server: SimServer,
        *,
        chat: bool,
        stream: bool,
        include_usage: bool,
        response_id: str,
        model: str,
        responses: dict[str, Any] | None = None,
    ) -> None:
        self.reply = reply
        #: the `/v1/responses` request this chat request serves (answered as a `Response`)
        self.responses = responses
        self.server = server
        self.chat = chat
        self.stream = stream
        self.include_usage = include_usage
        self.response_id = response_id
        self.created = int(time.time())
        self.sent = 0  # output tokens written
        self.started = False  # stream headers written
        self.dirty = False  # in the server's list of streams to flush
        self.done = False
        self.request: SimRequest | None = None
        kind = b"chat.completion.chunk" if chat else b"text_completion"
        self.head = b'{"id":"%s","object":"%s","created":%d,"model":%s,' % (
            response_id.encode(),
            kind,
            self.created,
            orjson.dumps(model),
        )

    # ---- streaming -----------------------------------------------------------------------
    def _content(self, text: str, finish: bytes) -> bytes:
        if self.chat:
            return event(
                self.head
                + b'"choices":[{"index":0,"delta":{"content":'
                + orjson.dumps(text)
                + b'},"logprobs":null,"finish_reason":'
                + finish
                + b"}]"
                + (self._sim_field() if finish != b"null" else b"")
                + b"}"
            )
        return event(
            self.head
            + b'"choices":[{"index":0,"text":'
            + orjson.dumps(text)
            + b',"logprobs":null,"finish_reason":'
            + finish
            + b"}]"
            + (self._sim_field() if finish != b"null" else b"")
            + b"}"
        )

    def _start(self) -> bytes:
        self.started = True
        head = stream_head(self.reply.keep_alive)
        if not self.chat:
            return head
        role = event(
            self.head + b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
            b'"logprobs":null,"finish_reason":null}]}'
        )
        return head + chunk(role)

    def flush(self) -> None:
        """Write the tokens generated since the last write as one SSE event."""
        self.dirty = False
        request = self.request
        if self.done or request is None or self.reply.closed:
            return
        produced = request.num_output
        if produced <= self.sent:
            return
        data = self._start() if not self.started else b""
        data += chunk(self._content(output_text(self.sent, produced), b"null"))
        self.sent = produced
        self.reply.write(data)

    def finish(self) -> None:
        """The request finished: write the rest (stream) or the whole answer, then release."""
        if self.done:
            return
        self.done = True
        self.dirty = False
        request = self.request
        assert request is not None
        reply = self.reply
        if reply.closed:
            return
        if not self.stream:
            reply.end(response(200, self._body(request), reply.keep_alive))
        else:
            data = self._start() if not self.started else b""
            events = self._content(output_text(self.sent, request.num_output), b'"length"')
            self.sent = request.num_output
            if self.include_usage:
                events += event(
                    self.head
                    + b'"choices":[],"usage":'
                    + orjson.dumps(_usage(request))
                    + self._sim_field()
                    + b"}"
                )
            events += DONE
            reply.end(data + chunk(events) + LAST_CHUNK)

    def abort(self) -> None:
        """The connection is lost: the engine drops the request."""
        self.done = True
        if self.request is not None:
            self.server.engine.abort(self.request)

    def _sim_field(self) -> bytes:
        assert self.request is not None
        return b',"sim":' + orjson.dumps(_sim(self.request))

    def _body(self, request: SimRequest) -> bytes:
        text = output_text(0, request.num_output)
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": "length",
            }
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
            kind = "text_completion"
        body = {
            "id": self.response_id,
            "object": kind,
            "created": self.created,
            "model": self.server.model_name,
            "choices": [choice],
            "usage": _usage(request),
            "sim": _sim(request),
        }
        if self.responses is not None:
            answer = chat_to_response(
                self.responses,
                body,
                response_id="resp_" + self.response_id.removeprefix("chatcmpl-"),
            )
            body = {**answer, "sim": body["sim"]}
        return orjson.dumps(body)


def _usage(request: SimRequest) -> dict[str, Any]:
    return {
        "prompt_tokens": request.prompt_len,
        "completion_tokens": request.num_output,
        "total_tokens": request.prompt_len + request.num_output,
        "prompt_tokens_details": {"cached_tokens": max(request.cached_tokens, 0)},
    }


def _sim(request: SimRequest) -> dict[str, Any]:
    out: dict[str, Any] = request.timings()
    out["arrival_s"] = request.arrival
    out["finish_s"] = request.finish_time
    out["preemptions"] = request.preemptions
    out["cached_tokens"] = max(request.cached_tokens, 0)
    return out
