"""`x-request-id` on every response, and the envelope for crashes.

A pure ASGI middleware rather than Starlette's `BaseHTTPMiddleware`: it does not buffer or
re-wrap streamed bodies (file downloads, uploads pass straight through) and costs one dict
lookup per request.

A client-supplied `x-request-id` is echoed (if it is short and printable) so callers can
correlate logs across systems; otherwise we mint `req_<32 hex>`. The id is also put in
`scope["state"]["request_id"]` for handlers and logs.

FastAPI installs Starlette's `ServerErrorMiddleware` *outside* user middleware, so an unhandled
exception would otherwise reach the client as a plain-text 500 without our header. We catch it
here instead: log it, and if the response has not started, send the OpenAI error envelope.
If a streamed response already started, the only honest thing left is to abort the
connection, so we re-raise and let the server do that.

A client that goes away mid-request (`ClientDisconnect` from reading its body, also what a
stalled body cut off by the server looks like to the app) is logged quietly: nobody is left to
answer, and it is not a crash.
"""

from __future__ import annotations

import logging
import secrets

import orjson
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backfill.api.errors import internal_error_body

log = logging.getLogger("backfill.api")

_HEADER = b"x-request-id"
_MAX_CLIENT_ID = 128


def _client_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == _HEADER:
            try:
                text: str = value.decode("ascii")
            except UnicodeDecodeError:
                return None
            if 0 < len(text) <= _MAX_CLIENT_ID and text.isprintable():
                return text
            return None
    return None


def new_request_id() -> str:
    return "req_" + secrets.token_hex(16)


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _client_request_id(scope) or new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        header = (_HEADER, request_id.encode("ascii"))
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [h for h in message.get("headers", ()) if h[0].lower() != _HEADER]
                headers.append(header)
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            log.info(
                "client went away during %s %s (request %s)",
                scope.get("method"),
                scope.get("path"),
                request_id,
            )
        except Exception:
            log.exception(
                "unhandled error in %s %s (request %s)",
                scope.get("method"),
                scope.get("path"),
                request_id,
            )
            if started:
                raise
            body = orjson.dumps(internal_error_body())
            await send_with_id(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode("ascii")),
                    ],
                }
            )
            await send_with_id({"type": "http.response.body", "body": body})
