"""HTTP limits against hostile clients, on a real port: each attack is cut off while a normal
client (the openai SDK, or `requests`) keeps being served in bounded time.

The server here is this module's own, started with small limits through `BACKFILL_*` variables
(2 s header and body deadlines, 16 KiB of headers, 40 connections, 5 wrong keys a minute), so
each attack needs only a few seconds. Raw sockets speak to it on loopback only. Timings are
bounded generously (the machine is shared): what is asserted is that the attack ends and that
normal requests are answered within seconds, not how fast.
"""

from __future__ import annotations

import concurrent.futures
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
from openai import OpenAI
from polling import poll

from backfill.testing import UpstreamProcess
from backfill.testing.server import BackfillProcess

KEY = "sk-http-limits"
MAX_HEADER_BYTES = 16 * 1024
MAX_CONNECTIONS = 40
FAILED_KEYS = 5
SERVED_WITHIN = 10.0  # seconds a normal request may take while an attack runs
ENV = {
    "BACKFILL_HTTP_MAX_HEADER_BYTES": str(MAX_HEADER_BYTES),
    "BACKFILL_HTTP_HEADER_TIMEOUT_SECONDS": "2",
    "BACKFILL_HTTP_BODY_IDLE_SECONDS": "2",
    "BACKFILL_HTTP_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
    "BACKFILL_AUTH_FAILURE_LIMIT": str(FAILED_KEYS),
    "BACKFILL_AUTH_FAILURE_WINDOW_SECONDS": "60",
}


@pytest.fixture(scope="module")
def limited_server(
    upstream: UpstreamProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BackfillProcess]:
    with BackfillProcess(
        tmp_path_factory.mktemp("http-limits") / "data",
        api_keys=[KEY],
        models=[f"m={upstream.url}"],
        env=ENV,
    ) as proc:
        yield proc


@pytest.fixture(scope="module")
def sdk(limited_server: BackfillProcess) -> OpenAI:
    # retries as real clients do: at the cap, the server may close an idle pooled connection
    return OpenAI(base_url=limited_server.base_url, api_key=KEY, max_retries=2, timeout=30.0)


def root(server: BackfillProcess) -> str:
    return f"http://{server.host}:{server.port}"


def connect(server: BackfillProcess) -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=30)
    return sock


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (or `timeout` passes)."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        except TimeoutError:
            break
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"the server kept the connection open for {timeout}s; got {data!r}")


def parse(raw: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, orjson.loads(body) if body else None


def assert_envelope(body: Any, code: str | None = None) -> None:
    assert set(body) >= {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    if code is not None:
        assert body["error"]["code"] == code, body


class Prober:
    """A normal client polling `/health` in the background; records each answer's time."""

    def __init__(self, server: BackfillProcess) -> None:
        self.url = f"{root(server)}/health"
        self.times: list[float] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                resp = requests.get(self.url, timeout=SERVED_WITHIN)
                assert resp.status_code == 200, resp.text
            except BaseException as exc:
                self.errors.append(exc)
            self.times.append(time.monotonic() - start)
            self._stop.wait(0.05)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(SERVED_WITHIN + 5)
        assert not self.errors, self.errors[:3]
        assert self.times, "no normal request was made"
        assert max(self.times) < SERVED_WITHIN, self.times


def test_an_oversize_header_gets_431_at_once_without_stalling_others(
    limited_server: BackfillProcess,
) -> None:
    sock = connect(limited_server)
    sent = 0
    with Prober(limited_server):
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:
            for _ in range(320):  # 20 MiB, the server cuts it off long before
                sock.sendall(b"a" * 65536)
                sent += 65536
        except OSError:
            pass  # the server closed its side: expected
        status, headers, body = parse(read_until_closed(sock, 15))
    assert status == 431
    assert headers["content-type"] == "application/json"
    assert headers["x-request-id"]
    assert_envelope(body, "request_header_fields_too_large")


def test_too_many_header_fields_get_431(limited_server: BackfillProcess) -> None:
    sock = connect(limited_server)
    fields = b"".join(b"X-F%d: 1\r\n" % i for i in range(500))
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
    status, _, body = parse(read_until_closed(sock, 15))
    assert status == 431
    assert_envelope(body, "request_header_fields_too_large")


def test_a_header_trickle_is_cut_off(limited_server: BackfillProcess) -> None:
    sock = connect(limited_server)
    request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 200 + b"\r\n\r\n"
    answer = b""
    deadline = time.monotonic() + 15  # the trickle alone would take 45 s
    with Prober(limited_server):
        for byte in request:
            assert time.monotonic() < deadline, "the trickle was never cut off"
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            sock.settimeout(0.2)  # one byte per 0.2 s, reading whatever comes back
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
        else:
            raise AssertionError("the server read the whole trickled request")
    status, _, body = parse(answer or read_until_closed(sock, 5))
    assert status == 408
    assert_envelope(body, "request_timeout")


def test_an_upload_idle_mid_body_is_cut_off_and_nothing_is_stored(
    limited_server: BackfillProcess, sdk: OpenAI
) -> None:
    before = {f.id for f in sdk.files.list()}
    sock = connect(limited_server)
    part = (
        b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b'--B\r\nContent-Disposition: form-data; name="file"; filename="stalled.jsonl"\r\n\r\n'
    )
    sock.sendall(
        b"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n"
        b"Content-Type: multipart/form-data; boundary=B\r\nContent-Length: 100000\r\n\r\n"
        + part
        + b"x" * 2000
    )
    with Prober(limited_server):
        status, headers, body = parse(read_until_closed(sock, 15))
    assert status == 408
    assert headers["connection"] == "close"
    assert_envelope(body, "request_timeout")
    assert {f.id for f in sdk.files.list()} == before


def test_a_flood_of_idle_connections_is_cut_off_while_the_sdk_is_served(
    limited_server: BackfillProcess, sdk: OpenAI, tmp_path: Path
) -> None:
    idle = [connect(limited_server) for _ in range(300)]  # far over the 40 connections allowed
    try:
        path = tmp_path / "in.jsonl"
        path.write_text('{"custom_id": "a", "method": "POST", "url": "/v1/embeddings"}\n')
        for _ in range(3):
            start = time.monotonic()
            assert [m.id for m in sdk.models.list()] == ["m"]
            uploaded = sdk.files.create(file=path.open("rb"), purpose="batch")
            assert sdk.files.retrieve(uploaded.id).bytes == path.stat().st_size
            assert time.monotonic() - start < SERVED_WITHIN
        for sock in idle:  # each is closed: made room for others, or past the header deadline
            assert read_until_closed(sock, 15) == b""
    finally:
        for sock in idle:
            sock.close()


def test_at_the_cap_with_every_connection_busy_a_new_one_gets_503(
    limited_server: BackfillProcess, upstream: UpstreamProcess
) -> None:
    url = f"{limited_server.base_url}/chat/completions"
    auth = {"Authorization": f"Bearer {KEY}"}
    texts = [f"busy {uuid.uuid4().hex} #sleep:6000" for _ in range(MAX_CONNECTIONS)]

    def slow(text: str) -> int:  # one connection each, busy for 6 s
        body = {"model": "m", "messages": [{"role": "user", "content": text}]}
        return requests.post(url, json=body, headers=auth, timeout=30).status_code

    def arrived() -> int:  # how many of them the upstream is working on
        stats = requests.get(upstream.url.removesuffix("/v1") + "/stats", timeout=30).json()
        return sum(text in stats["by_text"] for text in texts)

    with concurrent.futures.ThreadPoolExecutor(MAX_CONNECTIONS) as pool:
        busy = [pool.submit(slow, text) for text in texts]
        poll(
            arrived, lambda n: n >= MAX_CONNECTIONS, what="the busy requests to arrive", timeout=20
        )
        start = time.monotonic()
        refused = requests.get(f"{root(limited_server)}/health", timeout=SERVED_WITHIN)
        assert time.monotonic() - start < SERVED_WITHIN
        assert all(f.result() == 200 for f in busy)
    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["content-type"] == "application/json"
    assert_envelope(refused.json(), "server_busy")
    assert requests.get(f"{root(limited_server)}/health", timeout=SERVED_WITHIN).ok


def test_wrong_keys_from_one_address_get_429_but_known_keys_still_work(
    limited_server: BackfillProcess, sdk: OpenAI
) -> None:
    sdk.models.list()  # the good key is known from now on
    url = f"{limited_server.base_url}/models"
    codes = []
    for i in range(FAILED_KEYS + 3):
        resp = requests.get(url, headers={"Authorization": f"Bearer sk-wrong-{i}"}, timeout=30)
        codes.append(resp.status_code)
    assert codes == [401] * FAILED_KEYS + [429] * 3
    assert 1 <= int(resp.headers["retry-after"]) <= 60
    assert_envelope(resp.json(), "rate_limit_exceeded")
    assert resp.json()["error"]["type"] == "rate_limit_error"
    assert [m.id for m in sdk.models.list()] == ["m"]  # successes are not slowed


def test_http_layer_errors_are_the_openai_envelope(limited_server: BackfillProcess) -> None:
    base = root(limited_server)
    auth = {"Authorization": f"Bearer {KEY}"}
    cases: list[tuple[Callable[[], requests.Response], int, str]] = [
        (lambda: requests.get(f"{base}/v1/nope", timeout=30), 404, "unknown_url"),
        (lambda: requests.put(f"{base}/v1/files", timeout=30), 405, "method_not_allowed"),
        (
            lambda: requests.post(f"{base}/v1/batches", data=b"{bad", headers=auth, timeout=30),
            400,
            "invalid_json",
        ),
        (
            lambda: requests.post(
                f"{base}/v1/batches", data=b" " * (2 << 20), headers=auth, timeout=30
            ),
            413,
            "file_too_large",
        ),
    ]
    for send, status, code in cases:
        resp = send()
        assert resp.status_code == status, resp.text
        assert resp.headers["content-type"] == "application/json"
        assert resp.headers["x-request-id"]
        assert_envelope(resp.json(), code)
    assert requests.put(f"{base}/v1/files", timeout=30).headers["allow"] == "GET, POST"

    sock = connect(limited_server)
    sock.sendall(b"\x00not http at all\r\n\r\n")
    status, headers, body = parse(read_until_closed(sock, 15))
    assert status == 400
    assert headers["content-type"] == "application/json"
    assert_envelope(body, "invalid_http_request")


def test_readiness_fails_while_the_blob_store_cannot_be_written(
    limited_server: BackfillProcess,
) -> None:
    ready = f"{root(limited_server)}/health/ready"
    resp = requests.get(ready, timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"status": "ok", "checks": {"store": "ok", "blobs": "ok"}}

    blobs = limited_server.data_dir / "blobs"
    moved = limited_server.data_dir / "blobs-away"
    blobs.rename(moved)
    blobs.write_text("not a folder")  # every write under it now fails
    try:
        resp = wait_for_status(ready, 503)
        body = resp.json()
        assert_envelope(body, "not_ready")
        assert body["checks"] == {"store": "ok", "blobs": "error"}
        assert resp.headers["retry-after"] == "1"
        assert requests.get(f"{root(limited_server)}/health", timeout=30).status_code == 200
    finally:
        blobs.unlink()
        moved.rename(blobs)
    wait_for_status(ready, 200)


def wait_for_status(url: str, status: int, timeout: float = 15.0) -> requests.Response:
    """Poll until `url` answers `status` (readiness is cached for a second)."""
    return poll(
        lambda: requests.get(url, timeout=30),
        lambda resp: resp.status_code == status,
        what=f"{url} to answer {status}",
        timeout=timeout,
        interval=0.1,
    )
