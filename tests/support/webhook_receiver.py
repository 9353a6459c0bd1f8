"""A webhook receiver for tests: a real HTTP server on loopback that checks every delivery with
the official `openai` SDK's `client.webhooks.unwrap` and keeps what it saw.

`fail_with` makes it answer that status (e.g. 503) to every delivery until set back to None;
`hang` makes it hold each request without answering until released. A delivery counts as
*accepted* when the receiver answered it 2xx; `accepted_ids` lists the `webhook-id` of each,
repeats included, so a test can assert each event was accepted exactly once.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import openai


@dataclass
class Delivery:
    webhook_id: str
    headers: dict[str, str]
    body: bytes
    event: Any  # the SDK's typed event, or None when unwrap refused it
    error: str | None
    answered: int


@dataclass
class Receiver:
    secret: str
    fail_with: int | None = None
    hang: threading.Event | None = None  # set: answer; unset: hold the request
    deliveries: list[Delivery] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None
    arrived: int = 0  # requests that reached the handler, answered or not yet

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/hooks"

    @property
    def accepted_ids(self) -> list[str]:
        with self.lock:
            return [d.webhook_id for d in self.deliveries if 200 <= d.answered < 300]

    @property
    def accepted(self) -> list[Delivery]:
        with self.lock:
            return [d for d in self.deliveries if 200 <= d.answered < 300]

    def attempts(self) -> int:
        with self.lock:
            return len(self.deliveries)

    def start(self, port: int = 0) -> Receiver:
        receiver = self
        client = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1")

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with receiver.lock:
                    receiver.arrived += 1
                if receiver.hang is not None:
                    receiver.hang.wait(timeout=120)
                event, error = None, None
                try:
                    event = client.webhooks.unwrap(body, headers, secret=receiver.secret)
                except Exception as exc:  # the SDK refused it: signature, timestamp, shape
                    error = f"{type(exc).__name__}: {exc}"
                status = 400 if error else (receiver.fail_with or 200)
                with receiver.lock:
                    receiver.deliveries.append(
                        Delivery(headers.get("webhook-id", ""), headers, body, event, error, status)
                    )
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
