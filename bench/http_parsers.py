"""What the HTTP limits cost: server CPU per request with uvicorn's httptools protocol, ours
(`api/protocol.py`: the same parser plus header limits, deadlines and the connection cap), and
uvicorn's h11 protocol with `h11_max_incomplete_event_size` (the header limit uvicorn has).

Each runs the real app (`Service.api_app()`, SQLite in a temporary folder, the echo upstream)
in its own process; keep-alive clients on threads send `GET /health` and then streamed
`POST /v1/chat/completions` (the real-time relay the harvest benchmarks drive). Printed: the
server's CPU time per request (user + system, from /proc via psutil) and its ratio to
httptools. Numbers are noisy on a shared machine: compare ratios, and run it twice.

    python bench/http_parsers.py [--requests 4000] [--clients 8]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from backfill.testing.process import start_upstream
from backfill.testing.server import free_port

KEY = "sk-bench"
KINDS = ("httptools", "limited", "h11")


def serve(kind: str, port: int, data_dir: str, upstream: str) -> None:
    import uvicorn

    from backfill.api.protocol import HttpLimits, protocol_class
    from backfill.service import Service
    from backfill.settings import build_settings

    settings = build_settings(
        model_specs=[f"m={upstream}"], data_dir=Path(data_dir), port=port, api_keys=[KEY]
    )
    app = Service(settings).api_app()
    http: object = {"httptools": "httptools", "h11": "h11"}.get(kind) or protocol_class(
        HttpLimits()
    )
    config = uvicorn.Config(
        app,
        port=port,
        log_level="warning",
        access_log=False,
        http=http,  # type: ignore[arg-type]
        ws="none",
        lifespan="on",
        timeout_keep_alive=75,
        h11_max_incomplete_event_size=64 * 1024,
    )
    uvicorn.Server(config).run()


def _read_response(sock: socket.socket, buf: bytes) -> bytes:
    """Read one response (content-length or chunked); return what is left over."""
    while b"\r\n\r\n" not in buf:
        buf += sock.recv(65536)
    head, _, rest = buf.partition(b"\r\n\r\n")
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        while b"0\r\n\r\n" not in rest:
            rest += sock.recv(65536)
        return rest.split(b"0\r\n\r\n", 1)[1]
    length = int(lower.split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(rest) < length:
        rest += sock.recv(65536)
    return rest[length:]


def drive(port: int, request: bytes, count: int, clients: int) -> float:
    def client(n: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            buf = b""
            for _ in range(n):
                sock.sendall(request)
                buf = _read_response(sock, buf)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(count // clients,)) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--serve", nargs=4, metavar=("KIND", "PORT", "DIR", "UPSTREAM"))
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]), args.serve[2], args.serve[3])
        return
    health = b"GET /health HTTP/1.1\r\nHost: bench\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"
    body = json.dumps(
        {
            "model": "m",
            "stream": True,
            "messages": [{"role": "user", "content": "the quick brown fox jumps over it"}],
        }
    ).encode()
    chat = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
    ) + body
    results: dict[str, dict[str, float]] = {}
    with start_upstream() as upstream:
        for kind in KINDS:
            port = free_port()
            with tempfile.TemporaryDirectory() as data_dir:
                cmd = [sys.executable, __file__, "--serve", kind, str(port), data_dir]
                proc = subprocess.Popen([*cmd, upstream.url])
                try:
                    deadline = time.monotonic() + 60
                    while True:
                        try:
                            socket.create_connection(("127.0.0.1", port)).close()
                            break
                        except OSError:
                            if time.monotonic() > deadline:
                                raise
                            time.sleep(0.1)
                    server = psutil.Process(proc.pid)
                    drive(port, health, 400, 4)  # warm up
                    drive(port, chat, 200, 4)
                    results[kind] = {}
                    for name, request in (("health", health), ("chat stream", chat)):
                        before = server.cpu_times()
                        wall = drive(port, request, args.requests, args.clients)
                        after = server.cpu_times()
                        cpu = after.user + after.system - before.user - before.system
                        results[kind][name] = cpu / args.requests * 1e6
                        print(
                            f"{kind:10s} {name:12s} {cpu / args.requests * 1e6:7.0f} us CPU/req "
                            f"{args.requests / wall:7.0f} req/s",
                            flush=True,
                        )
                finally:
                    proc.terminate()
                    proc.wait(15)
    for kind in KINDS:
        ratios = ", ".join(
            f"{name} {results[kind][name] / results['httptools'][name]:.3f}x"
            for name in results[kind]
        )
        print(f"{kind:10s} CPU per request vs httptools: {ratios}")


if __name__ == "__main__":
    main()
