"""One model on several upstream replicas (`engines/replicas.py`), through a real `backfill serve`.

- Failover: three echo upstreams, a batch of slow lines in progress, one upstream killed with
  kill -9. The batch completes with every custom_id exactly once; the requests the dead replica
  held are re-sent to the others; and the dead replica is sent no new request: its port is
  taken over by a listener that records every request line it is sent and answers none (so the
  health probes, GETs, keep failing and the replica stays drained), and it sees no POST.
- Streaming through the gateway goes to the replicas, and still works with one of them dead.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from acceptance_settings import FAST_ENV
from durability import (
    CRASH_ENV,
    TaggedBatch,
    assert_exactly_once,
    client_for,
    progress,
    wait_progress,
)
from sdk_helpers import submit, wait_batch

from backfill.testing import UpstreamProcess, start_upstream
from backfill.testing.server import BackfillProcess

KEY = "sk-acceptance-replicas"


class BlackHole:
    """Listens on a dead upstream's port: records each request line, answers nothing."""

    def __init__(self, host: str, port: int) -> None:
        self.lines: list[str] = []
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(1.0)
                try:
                    head = conn.recv(4096)
                except OSError:
                    continue
                if head:
                    self.lines.append(head.split(b"\r\n", 1)[0].decode("latin-1"))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


def write_config(path: Path, upstreams: list[UpstreamProcess], max_concurrency: int) -> Path:
    urls = ", ".join(f'"{u.url}"' for u in upstreams)
    path.write_text(f"[models.m]\nurls = [{urls}]\nmax_concurrency = {max_concurrency}\n")
    return path


def start_server(tmp_path: Path, config: Path, servers: list[BackfillProcess]) -> BackfillProcess:
    proc = BackfillProcess(
        tmp_path / "data",
        api_keys=[KEY],
        extra_args=["--config", str(config)],
        env={**FAST_ENV, **CRASH_ENV, "BACKFILL_SHARD_SIZE": "100"},
    )
    servers.append(proc)
    return proc.start()


def test_a_replica_killed_mid_batch_its_requests_go_elsewhere_exactly_once(
    tmp_path: Path, servers: list[BackfillProcess]
) -> None:
    upstreams = [start_upstream() for _ in range(3)]
    hole: BlackHole | None = None
    try:
        config = write_config(tmp_path / "backfill.toml", upstreams, max_concurrency=24)
        proc = start_server(tmp_path, config, servers)
        client = client_for(proc.base_url, KEY)
        work = TaggedBatch(600, sleep_ms=150)
        batch = submit(client, work.lines())

        victim = upstreams[1]
        now = wait_progress(client, batch.id, 120, lambda: proc.proc.poll() is None)  # type: ignore[union-attr]
        assert now.status == "in_progress", (now, proc.logs())
        before = work.seen(victim)  # what it was sent: answered, or in flight now
        victim.proc.kill()  # kill -9
        victim.proc.wait(5)
        hole = BlackHole(victim.host, victim.port)
        at_kill = progress(client.batches.retrieve(batch.id))

        done = wait_batch(client, batch.id, timeout=120)
        assert_exactly_once(client, done, work.ids)

        survivors = [work.seen(u) for u in (upstreams[0], upstreams[2])]
        served = set(survivors[0]) | set(survivors[1])
        texts = {f"{work.tag} {cid} #sleep:150" for cid in work.ids}
        assert before, "the victim was sent nothing before it died"
        assert served | set(before) == texts
        assert set(before) - served, "the victim answered nothing before it died"
        resent = served & set(before)
        assert resent, "the requests in flight at the victim were not re-sent elsewhere"
        assert len(served) > len(texts) - len(before)  # the survivors did the rest
        posts = [line for line in hole.lines if not line.startswith("GET ")]
        assert posts == [], f"the dead replica was sent new requests: {posts[:5]}"
        print(
            f"\nreplica failover: killed at {at_kill}/{work.n} recorded; the victim had been "
            f"sent {len(before)}, {len(resent)} of them re-sent elsewhere; "
            f"{len(hole.lines)} probes at its port, no request"
        )
    finally:
        if hole is not None:
            hole.close()
        for upstream in upstreams:
            upstream.stop()


def test_streaming_through_the_gateway_to_replicas(
    tmp_path: Path, servers: list[BackfillProcess]
) -> None:
    upstreams = [start_upstream() for _ in range(2)]
    try:
        config = write_config(tmp_path / "backfill.toml", upstreams, max_concurrency=8)
        proc = start_server(tmp_path, config, servers)
        # no SDK retries: a failed stream must not be hidden by the client sending it again
        client = client_for(proc.base_url, KEY).with_options(max_retries=0)

        def stream(text: str) -> str:
            chunks = client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": text}], stream=True
            )
            parts = [c.choices[0].delta.content or "" for c in chunks if c.choices]
            assert len(parts) > 1  # streamed, not one buffered answer
            return "".join(parts)

        for i in range(6):
            assert f"stream {i} one two" in stream(f"stream {i} one two")
        counts = [u.stats()["requests"] for u in upstreams]
        assert all(c > 0 for c in counts), counts  # both replicas served streams

        upstreams[0].proc.kill()
        upstreams[0].proc.wait(5)
        for i in range(4):  # the dead one is tried at most once, then drained
            assert f"after {i}" in stream(f"after {i}")
        assert upstreams[1].stats()["requests"] == counts[1] + 4
    finally:
        for upstream in upstreams:
            upstream.stop()
