"""Inputs through a real `backfill serve`: request numbers reach the upstream exactly as written
(batch and real time), and text no store can keep is a 400.

Own server, on a recording upstream: a stdlib HTTP server on loopback that keeps the raw bytes
of every request it is sent and answers a fixed chat completion. The shared echo upstream reads
bodies with orjson itself, so it could not tell an exact number from a rounded one.
"""

from __future__ import annotations

import http.server
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from openai import BadRequestError, OpenAI
from sdk_helpers import jsonl, run_batch, upload
from suite_settings import SERVER_ENV

from backfill.testing.server import BackfillProcess

KEY = "sk-exact-inputs-0123456789"
ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 0,
    "model": "exact",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}
#: written by hand, as a user would: orjson alone turns the first two into other numbers and
#: refuses the third
SEED = "18446744073709551616"
TEMPERATURE = "0.1000000000000000000001"
HUGE = "-1e400"


class Recorder(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.bodies: list[bytes] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Recorder
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("content-length", "0")))
        with self.server.lock:
            self.server.bodies.append(raw)
        body = json.dumps(ANSWER).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.send_response(404)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    server = Recorder()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def exact_server(
    recorder: Recorder, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BackfillProcess]:
    with BackfillProcess(
        tmp_path_factory.mktemp("exact"),
        api_keys=[KEY],
        models=[f"exact={recorder.url}"],
        env=SERVER_ENV,
    ) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(exact_server: BackfillProcess) -> OpenAI:
    return OpenAI(base_url=exact_server.base_url, api_key=KEY, max_retries=0, timeout=15.0)


def sent_with(recorder: Recorder, marker: str) -> list[bytes]:
    with recorder.lock:
        return [b for b in recorder.bodies if marker.encode() in b]


def line(custom_id: str, extra: str) -> str:
    return (
        f'{{"custom_id": "{custom_id}", "method": "POST", "url": "/v1/chat/completions", '
        f'"body": {{"model": "exact", "messages": [{{"role": "user", "content": "{custom_id}"}}]'
        f", {extra}}}}}"
    )


def test_batch_request_numbers_reach_the_upstream_as_written(
    client: OpenAI, recorder: Recorder
) -> None:
    lines = [
        line("big-numbers", f'"seed": {SEED}, "temperature": {TEMPERATURE}'),
        line("huge-number", f'"logit_bias": {{"50256": {HUGE}}}'),
    ]
    batch = run_batch(client, lines)
    assert batch.status == "completed", batch.errors
    assert batch.request_counts is not None and batch.request_counts.completed == 2
    [first] = sent_with(recorder, "big-numbers")
    assert f'"seed":{SEED}'.encode() in first, first
    assert f'"temperature":{TEMPERATURE}'.encode() in first, first
    [second] = sent_with(recorder, "huge-number")
    assert f'{{"50256":{HUGE}}}'.encode() in second, second


def test_real_time_request_numbers_reach_the_upstream_as_written(
    exact_server: BackfillProcess, recorder: Recorder
) -> None:
    raw = (
        b'{"model": "exact", "messages": [{"role": "user", "content": "real-time"}], '
        b'"seed": %s, "temperature": %s}' % (SEED.encode(), TEMPERATURE.encode())
    )
    request = urllib.request.Request(
        exact_server.base_url + "/chat/completions",
        data=raw,
        headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=15) as resp:
        assert resp.status == 200
    [sent] = sent_with(recorder, "real-time")
    assert f'"seed":{SEED}'.encode() in sent and f'"temperature":{TEMPERATURE}'.encode() in sent


def get_error(server: BackfillProcess, path: str) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        server.base_url + path, headers={"authorization": f"Bearer {KEY}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=15) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize(
    ("path", "param"),
    [("/files/file-a%00b", "file_id"), ("/batches?after=batch_%00", "after")],
)
def test_nul_in_a_url_is_a_400(exact_server: BackfillProcess, path: str, param: str) -> None:
    status, body = get_error(exact_server, path)
    assert status == 400, body
    assert body["error"]["param"] == param
    assert body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("window", [" 24h", "24 h", "\uff12\uff14h"])
def test_sloppy_completion_windows_are_refused(client: OpenAI, window: str) -> None:
    file = upload(client, jsonl([line("w", '"n": 1')]))
    with pytest.raises(BadRequestError) as info:
        client.batches.create(
            input_file_id=file.id,
            endpoint="/v1/chat/completions",
            completion_window=window,  # type: ignore[arg-type]
        )
    assert info.value.response.json()["error"]["param"] == "completion_window"


def test_recorder_is_a_real_server(recorder: Recorder) -> None:
    """The recording upstream itself keeps bytes verbatim (the test's own premise)."""
    request = urllib.request.Request(recorder.url + "/x", data=b'{"n": 1e400, "check": 1}')
    with urllib.request.urlopen(request, timeout=5) as resp:
        assert resp.status == 200
    assert sent_with(recorder, '"check"') == [b'{"n": 1e400, "check": 1}']
