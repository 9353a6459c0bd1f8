"""A stuck database must not stall the API (issue 11).

Another connection holds a lock the server's writes need (SQLite: `BEGIN IMMEDIATE` on the same
database file, i.e. the one write lock; PostgreSQL: `LOCK TABLE files IN EXCLUSIVE MODE`, which
still lets plain reads of the table through) for `HOLD` seconds while a real `backfill serve` is
hammered by `WRITERS` concurrent uploads, more than its threads and pooled connections. What
must hold while the lock is held:

- reads (`GET /v1/batches/{id}`, `GET /v1/files`) keep answering, each within `READ_BOUND`;
- every upload answers 503 with `retry-after` in the OpenAI error shape within about the
  configured `store_busy_timeout` (`BUSY`): never a hang, never a 500;
- on PostgreSQL, writes that do not need the locked table (creating a batch) go through;

and after the release everything works again (uploads, a whole batch) and nothing stored before
or during the fault is lost; the scheduler and the worker told the outage once when it began
and once when it ended, with no traceback in between. Bounds are generous (2-core CI machines
are noisy); the sharper check is that the reads were answered while the lock was still held.
The last tests take the store seam alone: a held lock, or no free pooled connection, becomes
`StoreBusy` within the busy timeout while reads go on.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from fault_harness import postgres_table_lock, sqlite_write_lock
from polling import poll

from backfill.domain.records import FileRecord
from backfill.errors import StoreBusy
from backfill.store.sql import SqlStore
from backfill.testing import UpstreamProcess, start_upstream
from backfill.testing.postgres import scratch_postgres_database
from backfill.testing.server import BackfillProcess

KEY = "sk-faults-stuck-store"
BUSY = 3.0  # the server's BACKFILL_STORE_BUSY_TIMEOUT
HOLD = 15.0  # how long the lock is held
WRITERS = 40  # concurrent uploads: all of the old shared thread pool, more than its 25 connections
READ_BOUND = 5.0
WRITE_BOUND = 2 * BUSY + 4.0  # a queue for a write slot, then the lock wait, plus noise
ENV = {
    "BACKFILL_STORE_BUSY_TIMEOUT": str(BUSY),
    "BACKFILL_SHARD_SIZE": "2",
    "BACKFILL_FLUSH_EVERY_SECONDS": "0.1",
    "BACKFILL_SCHEDULER_INTERVAL": "0.1",
    "BACKFILL_LEASE_SECONDS": "5",
    "BACKFILL_OUTAGE_BACKOFF_MAX": "1",  # background recovery is told 2 * (1 + BUSY) s later
}
ERROR_KEYS = {"message", "type", "param", "code"}


@dataclass(frozen=True)
class Answer:
    what: str
    status: int  # 0: no answer (client timeout or connection error)
    started: float
    ended: float
    retry_after: str | None
    body: Any

    @property
    def seconds(self) -> float:
        return self.ended - self.started


def _lines(tag: str, n: int = 4) -> bytes:
    rows = [
        {
            "custom_id": f"{tag}-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "user", "content": f"{tag} {i}"}]},
        }
        for i in range(n)
    ]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


class Client:
    """A tiny HTTP client for one server (one session per thread)."""

    def __init__(self, server: BackfillProcess) -> None:
        self.base = server.base_url + "/"
        self.session = requests.Session()
        self.session.headers["authorization"] = f"Bearer {KEY}"

    def get(self, path: str) -> requests.Response:
        return self.session.get(self.base + path, timeout=60)

    def post(self, path: str, **kw: Any) -> requests.Response:
        return self.session.post(self.base + path, timeout=60, **kw)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.session.close()


def _client(server: BackfillProcess) -> Client:
    return Client(server)


def _ask(what: str, send: Callable[[], requests.Response]) -> Answer:
    started = time.monotonic()
    try:
        resp = send()
    except requests.RequestException:
        return Answer(what, 0, started, time.monotonic(), None, None)
    ended = time.monotonic()
    try:
        body = resp.json()
    except ValueError:
        body = resp.text
    return Answer(what, resp.status_code, started, ended, resp.headers.get("retry-after"), body)


def _upload(c: Client, tag: str) -> requests.Response:
    return c.post("files", files={"file": (f"{tag}.jsonl", _lines(tag))}, data={"purpose": "batch"})


def _create_batch(c: Client, file_id: str) -> requests.Response:
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions"}
    return c.post("batches", json={**body, "completion_window": "24h"})


def _wait_batch(c: Client, batch_id: str, timeout: float = 60.0) -> dict[str, Any]:
    batch: dict[str, Any] = poll(
        lambda: c.get(f"batches/{batch_id}").json(),
        lambda b: b.get("status") in ("completed", "failed", "expired", "cancelled"),
        what=f"batch {batch_id} to finish",
        timeout=timeout,
        interval=0.1,
    )
    return batch


def _run_batch(c: Client, tag: str) -> tuple[str, dict[str, Any], str]:
    """Upload, create and finish one batch: (input file id, batch, output text)."""
    up = _upload(c, tag)
    assert up.status_code == 200, up.text
    created = _create_batch(c, up.json()["id"])
    assert created.status_code == 200, created.text
    batch = _wait_batch(c, created.json()["id"])
    assert batch["status"] == "completed", batch
    assert batch["request_counts"]["completed"] == 4, batch
    output = c.get(f"files/{batch['output_file_id']}/content")
    assert output.status_code == 200
    return up.json()["id"], batch, output.text


Send = Callable[["Client", int], requests.Response]


def _loop(
    stop: threading.Event, what: str, server: BackfillProcess, out: list[Answer], send: Send,
    pause: float,
) -> None:  # fmt: skip
    """Send until stopped, `pause` seconds apart; the i-th call gets i."""
    with _client(server) as c:
        i = 0
        while not stop.is_set():
            out.append(_ask(what, functools.partial(send, c, i)))
            i += 1
            if pause:
                stop.wait(pause)


@dataclass
class Fault:
    """What happened during one held lock."""

    answers: list[Answer]
    held_at: float
    released_at: float

    def during(self, what: str) -> list[Answer]:
        """Answers that arrived while the lock was still held."""
        return [a for a in self.answers if a.what == what and a.ended < self.released_at]

    def started_during(self, what: str) -> list[Answer]:
        return [a for a in self.answers if a.what == what and a.started < self.released_at]


def _hold(
    server: BackfillProcess,
    lock: contextlib.AbstractContextManager[None],
    *,
    batch_id: str,
    file_id: str,
    extra: dict[str, tuple[Send, float]] | None = None,
) -> Fault:
    """Hold `lock` for HOLD seconds while WRITERS threads upload in a loop and two threads
    read; `extra` adds named loops (send, pause)."""
    answers: list[Answer] = []
    stop = threading.Event()
    loops: list[tuple[str, Send, float]] = [
        ("get_batch", lambda c, i: c.get(f"batches/{batch_id}"), 0.2),
        ("list_files", lambda c, i: c.get("files"), 0.2),
        ("get_file", lambda c, i: c.get(f"files/{file_id}"), 0.2),
    ]
    for n in range(WRITERS):
        loops.append(("upload", lambda c, i, n=n: _upload(c, f"w{n}-{i}"), 0.0))  # type: ignore[misc]
    for name, (send, pause) in (extra or {}).items():
        loops.append((name, send, pause))
    threads = [
        threading.Thread(target=_loop, args=(stop, what, server, answers, send, pause))
        for what, send, pause in loops
    ]
    with lock:
        held_at = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(HOLD)  # the fault's duration, not a synchronization
        released_at = time.monotonic()
    stop.set()
    for t in threads:
        t.join(120)
    assert server.proc is not None and server.proc.poll() is None, server.logs()
    return Fault(answers, held_at, released_at)


def _summary(fault: Fault) -> str:
    parts = []
    for what in sorted({a.what for a in fault.answers}):
        during = fault.during(what)
        if during:
            took = sorted(a.seconds for a in during)
            statuses = sorted({a.status for a in during})
            parts.append(
                f"{what}: {len(during)} answers {statuses}, "
                f"median {took[len(took) // 2]:.2f} s, max {took[-1]:.2f} s"
            )
    return "while locked: " + "; ".join(parts)


def _assert_reads_answered(fault: Fault) -> None:
    for what in ("get_batch", "list_files", "get_file"):
        during = fault.during(what)
        started = fault.started_during(what)
        slow = [round(a.seconds, 1) for a in started if a.seconds >= READ_BOUND]
        # paced at 0.2 s, a read that is never stuck answers dozens of times in HOLD seconds
        assert len(during) >= 10, (what, len(during), len(started), slow)
        assert not slow, f"{what}: reads took {slow} s while the database was locked"
        assert {a.status for a in during} == {200}, [(a.status, a.body) for a in during][:5]


def _assert_busy(answers: list[Answer]) -> None:
    """Every one is a quick 503 with retry-after in the OpenAI error shape."""
    assert answers
    for a in answers:
        assert a.status == 503, (a.status, a.body, round(a.seconds, 1))
        assert a.retry_after is not None and a.retry_after.isdigit(), a.retry_after
        assert int(a.retry_after) >= 1
        assert isinstance(a.body, dict) and set(a.body) == {"error"}, a.body
        assert set(a.body["error"]) == ERROR_KEYS, a.body
        assert a.body["error"]["type"] == "server_error", a.body
    slow = sorted(round(a.seconds, 1) for a in answers if a.seconds >= WRITE_BOUND)
    assert not slow, f"503s took {slow} s (bound {WRITE_BOUND} s)"


def _assert_recovered(
    server: BackfillProcess, kept: dict[str, str], before: tuple[str, dict[str, Any], str]
) -> None:
    """Uploads work again, a whole batch runs, and everything stored is still there."""
    with _client(server) as c:
        up = poll(
            lambda: _upload(c, "after-probe"),
            lambda r: r.status_code == 200,
            what="an upload to succeed after the release",
            timeout=30,
            interval=0.2,
        )
        kept[up.json()["id"]] = "after-probe.jsonl"
        after = _run_batch(c, "after")
        kept[after[0]] = "after.jsonl"
        listed = {f["id"]: f["filename"] for f in c.get("files").json()["data"]}
        missing = {k: v for k, v in kept.items() if listed.get(k) != v}
        assert not missing, f"files lost: {missing}"
        _, batch, output = before
        again = c.get(f"batches/{batch['id']}").json()
        assert again["status"] == "completed" and again["output_file_id"] == batch["output_file_id"]
        assert c.get(f"files/{batch['output_file_id']}/content").text == output
        assert len(output.splitlines()) == 4


def _assert_background_told_once(server: BackfillProcess) -> None:
    """The scheduler and the worker logged the outage once when it began and once when it
    ended (with a count), and no traceback in between."""
    opened = re.compile(r" WARNING (backfill\.\w+): (.+?) unavailable since .*, 1 failure")
    closed = re.compile(r" WARNING (backfill\.\w+): (.+?) available again: .*, (\d+) failures")
    deadline = time.monotonic() + 30
    while True:
        log = server.log_path.read_text(errors="replace")
        began = [m.groups() for m in opened.finditer(log)]
        ended = [m.groups()[:2] for m in closed.finditer(log)]
        if sorted(began) == sorted(ended) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert began, "no background loop noticed the outage"
    assert sorted(began) == sorted(ended), (began, ended)
    for episode in set(began):  # one episode; two if a retry landed just after the release
        assert began.count(episode) <= 2, began
    noisy = re.findall(r" ERROR backfill\.(?:scheduler|worker): .*", log)
    assert not noisy, noisy[:5]


def _uploaded(fault: Fault) -> dict[str, str]:
    """Uploads that were answered 200 (in flight when the lock went away): id -> filename."""
    return {
        a.body["id"]: a.body["filename"]
        for a in fault.answers
        if a.what == "upload" and a.status == 200
    }


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamProcess]:
    with start_upstream() as up:
        yield up


@pytest.fixture
def servers() -> Iterator[list[BackfillProcess]]:
    """Servers a test started; stopped at teardown."""
    started: list[BackfillProcess] = []
    try:
        yield started
    finally:
        for proc in started:
            proc.stop()


def _serve(
    data_dir: Path, upstream: UpstreamProcess, servers: list[BackfillProcess], *args: str
) -> BackfillProcess:
    server = BackfillProcess(
        data_dir, api_keys=[KEY], models=[f"m={upstream.url}"], extra_args=list(args), env=ENV
    )
    servers.append(server)
    return server.start()


def _explain(server: BackfillProcess) -> str:
    return "\n--- server log ---\n" + server.logs()


def test_sqlite_write_lock_held_by_another_process(
    tmp_path: Path, upstream: UpstreamProcess, servers: list[BackfillProcess]
) -> None:
    server = _serve(tmp_path / "data", upstream, servers)
    with _client(server) as c:
        before = _run_batch(c, "before")
        # submitted just before the fault: whatever step it is at, the lock stops it
        up = _upload(c, "inflight")
        inflight = _create_batch(c, up.json()["id"]).json()["id"]
    fault = _hold(
        server,
        sqlite_write_lock(tmp_path / "data" / "backfill.db"),
        batch_id=before[1]["id"],
        file_id=before[0],
    )
    print("\nsqlite " + _summary(fault))
    try:
        _assert_reads_answered(fault)
        _assert_busy(fault.during("upload"))
        assert len(fault.during("upload")) >= WRITERS  # every writer was answered in time
        kept = {before[0]: "before.jsonl", up.json()["id"]: "inflight.jsonl", **_uploaded(fault)}
        _assert_recovered(server, kept, before)
        with _client(server) as c:
            batch = _wait_batch(c, inflight)
            assert batch["status"] == "completed", batch
            assert batch["request_counts"]["completed"] == 4, batch
        _assert_background_told_once(server)
    except AssertionError as exc:
        raise AssertionError(str(exc) + _explain(server)) from None


def test_postgres_table_lock_held_by_another_connection(
    tmp_path: Path, upstream: UpstreamProcess, servers: list[BackfillProcess]
) -> None:
    with scratch_postgres_database() as url:
        server = _serve(tmp_path / "data", upstream, servers, "--database", url)
        with _client(server) as c:
            before = _run_batch(c, "before")

        def create(c: Client, i: int) -> requests.Response:
            return _create_batch(c, before[0])

        fault = _hold(
            server,
            postgres_table_lock(url, "files"),
            batch_id=before[1]["id"],
            file_id=before[0],
            extra={"create_batch": (create, 1.0)},
        )
        print("\npostgres " + _summary(fault))
        try:
            _assert_reads_answered(fault)
            _assert_busy(fault.during("upload"))
            assert len(fault.during("upload")) >= WRITERS
            # creating a batch writes `batches` only: it must not wait for the files lock
            created = fault.during("create_batch")
            assert len(created) >= 3, [(a.status, round(a.seconds, 1)) for a in created]
            assert {a.status for a in created} == {200}, [(a.status, a.body) for a in created]
            kept = {before[0]: "before.jsonl", **_uploaded(fault)}
            _assert_recovered(server, kept, before)
            # the batches created during the fault run once it is over (their output files
            # could not be recorded while `files` was locked)
            with _client(server) as c:
                for a in created:
                    assert _wait_batch(c, a.body["id"])["status"] == "completed"
            _assert_background_told_once(server)
        except AssertionError as exc:
            raise AssertionError(str(exc) + _explain(server)) from None
        finally:
            for s in servers:
                s.stop()  # before the scratch database is dropped


# -- the store seam alone: a lock held elsewhere becomes StoreBusy within the busy timeout -----


def _file(project_id: str, n: int) -> FileRecord:
    return FileRecord(f"file-{n}", project_id, f"{n}.jsonl", "batch", 1, 0, f"files/file-{n}")


def _gives_up(write: Callable[[], object], within: float) -> StoreBusy:
    started = time.monotonic()
    with pytest.raises(StoreBusy) as caught:
        write()
    took = time.monotonic() - started
    assert 0.8 * within <= took < within + 3.0, took
    return caught.value


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_store_gives_up_on_a_lock_held_elsewhere(kind: str, tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        if kind == "sqlite":
            url = f"sqlite:///{tmp_path / 'store.db'}"
            lock = sqlite_write_lock(tmp_path / "store.db")
        else:
            url = stack.enter_context(scratch_postgres_database())
            lock = postgres_table_lock(url, "files")
        store = SqlStore(url, busy_timeout=0.5)
        stack.callback(store.close)
        store.migrate()
        project = store.ensure_project("p")
        store.insert_file(_file(project.id, 0))
        with lock:
            busy = _gives_up(lambda: store.insert_file(_file(project.id, 1)), 0.5)
            assert busy.status_code == 503 and busy.retry_after >= 0.5
            assert store.get_file("file-0") is not None  # reads go on
            assert store.list_files(project.id).items
        store.insert_file(_file(project.id, 2))  # and writes, once it is gone
        assert [f.id for f in store.list_files(project.id, order="asc").items] == [
            "file-0",
            "file-2",
        ]


def test_store_gives_up_when_no_connection_is_free(tmp_path: Path) -> None:
    """Writers stuck on a lock can hold every pooled write connection: the next writer waits
    for one at most the busy timeout too, and reads have their own pool."""
    store = SqlStore(
        f"sqlite:///{tmp_path / 'store.db'}", busy_timeout=1.0, pool_size=1, max_overflow=0
    )
    try:
        store.migrate()
        project = store.ensure_project("p")
        store.insert_file(_file(project.id, 0))
        with store.engine.connect():  # the only write connection (pool_size=1, no overflow)
            busy = _gives_up(lambda: store.insert_file(_file(project.id, 1)), 1.0)
            assert "no free database connection" in busy.message
            assert store.get_file("file-0") is not None
        store.insert_file(_file(project.id, 1))
    finally:
        store.close()


def test_an_unreachable_postgres_is_busy_not_a_server_error() -> None:
    """No server on the port: 503 `StoreBusy` (retry later), not a 500."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    store = SqlStore(f"postgresql://postgres@127.0.0.1:{port}/none", busy_timeout=1.0)
    try:
        with pytest.raises(StoreBusy):
            store.get_batch("batch_x")
    finally:
        store.close()
