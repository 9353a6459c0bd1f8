"""Nothing computed is lost under ordinary faults: checkpoints that fail, a request that raises
inside backfill, lines and answers nested deeper than the JSON writer goes, upstream 200s with
bodies that are not JSON objects, and a cancel that must stop sending at once.

Each test runs real batches (real scheduler, worker and OpenAI engine over HTTP to the echo
upstream) on SQLite and on PostgreSQL with the local blob store, and ends with
`check_invariant`: every custom_id exactly once, counts that add up, no invented expiry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fault_harness import (
    Rig,
    chat_line,
    check_invariant,
    database_url,
    postgres_table_lock,
    sqlite_write_lock,
)
from polling import poll_async

from backfill.domain.statuses import BatchStatus
from backfill.testing import UpstreamProcess, start_upstream


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamProcess]:
    with start_upstream() as up:
        yield up


@pytest.fixture(params=["sqlite", "postgres"])
def rig_factory(request: pytest.FixtureRequest, tmp_path: Path, upstream: UpstreamProcess) -> Any:
    rigs: list[Rig] = []
    with database_url(request.param, tmp_path) as url:

        def make(**settings: Any) -> Rig:
            rig = Rig(tmp_path, url, upstream.url, **settings)
            rigs.append(rig)
            return rig

        try:
            yield make
        finally:
            for rig in rigs:
                rig.close()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_failed_checkpoints_keep_their_results(
    rig_factory: Any, upstream: UpstreamProcess, caplog: Any
) -> None:
    """Segment records refused by the store (locked past its busy timeout), then segment
    writes refused by a full disk: every result is kept and recorded once."""
    upstream.reset()
    rig = rig_factory()
    ids = [f"r{i}" for i in range(60)]
    rig.store.fail("record_segment", 6)
    rig.blobs.fail_segments(6)

    async def main() -> None:
        async with rig.service.background():
            batch_id = await rig.submit([chat_line(cid, f"hello {cid}") for cid in ids])
            batch = await rig.wait_done(batch_id)
            assert batch.status is BatchStatus.COMPLETED
            outcome = await rig.outcome(batch_id)
        check_invariant(outcome, ids)
        assert len(outcome.output) == 60
        for line in outcome.output:
            content = line["response"]["body"]["choices"][0]["message"]["content"]
            assert content == "echo: hello " + line["custom_id"]

    with caplog.at_level(logging.WARNING, logger="backfill.worker"):
        run(main())
    assert rig.store.failures["record_segment"] == 6
    assert rig.blobs.segment_failures == 6
    sent_once(upstream, [f"hello {cid}" for cid in ids])
    assert any("checkpoint" in r.getMessage() for r in caplog.records), "the failure is logged"


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_checkpoints_through_a_real_lock(
    kind: str, tmp_path: Path, upstream: UpstreamProcess, caplog: Any
) -> None:
    """Another connection holds the lock the checkpoints need (SQLite's write lock, or
    PostgreSQL's `segments` table) for three busy timeouts while the batch runs: the
    checkpoints fail with `StoreBusy`, keep their results, and land once the lock is gone."""
    upstream.reset()
    with database_url(kind, tmp_path) as url:
        rig = Rig(tmp_path, url, upstream.url, store_busy_timeout=1.0, lease_seconds=20.0)
        ids = [f"r{i}" for i in range(60)]
        lock = (
            sqlite_write_lock(tmp_path / "store.db")
            if kind == "sqlite"
            else postgres_table_lock(url, "segments")
        )

        def hold() -> None:
            with lock:
                time.sleep(3.0)

        async def main() -> None:
            async with rig.service.background():
                batch_id = await rig.submit([chat_line(cid, f"{cid} #sleep:100") for cid in ids])
                await poll_async(lambda: upstream.stats()["requests"] >= 5)
                await asyncio.to_thread(hold)
                batch = await rig.wait_done(batch_id)
                assert batch.status is BatchStatus.COMPLETED
                outcome = await rig.outcome(batch_id)
            check_invariant(outcome, ids)
            assert len(outcome.output) == 60

        try:
            with caplog.at_level(logging.WARNING, logger="backfill.worker"):
                run(main())
        finally:
            rig.close()
    sent_once(upstream, [f"{cid} #sleep:100" for cid in ids])
    failed = [r for r in caplog.records if "checkpoint" in r.getMessage()]
    assert failed and "StoreBusy" in failed[0].getMessage(), [r.getMessage() for r in failed]


def sent_once(upstream: UpstreamProcess, texts: list[str]) -> None:
    """Each request reached the upstream exactly once: no computed result was dropped and
    computed again."""
    by_text = upstream.stats()["by_text"]
    assert {t: by_text.get(t) for t in texts} == dict.fromkeys(texts, 1)


def test_store_failing_at_the_end_of_a_shard(rig_factory: Any, upstream: UpstreamProcess) -> None:
    """The last checkpoint and the end of the lease fail a few times: still all kept, and
    nothing is run twice."""
    upstream.reset()
    rig = rig_factory(flush_every_requests=1000, flush_every_seconds=30.0)
    ids = [f"r{i}" for i in range(25)]
    rig.store.fail("record_segment", 3)
    rig.store.fail("finish_shard", 2)

    async def main() -> None:
        async with rig.service.background():
            batch_id = await rig.submit([chat_line(cid, cid) for cid in ids])
            batch = await rig.wait_done(batch_id)
            assert batch.status is BatchStatus.COMPLETED
            check_invariant(await rig.outcome(batch_id), ids)

    run(main())
    assert rig.store.failures == {"record_segment": 3, "finish_shard": 2}
    sent_once(upstream, ids)


def test_an_exception_inside_one_request_is_that_lines_error(rig_factory: Any, caplog: Any) -> None:
    rig = rig_factory()
    engine = rig.service.engines["echo"]
    real_send = engine.send

    async def send(endpoint: str, body: dict[str, Any], **kw: Any) -> Any:
        if "#boom" in body["messages"][0]["content"]:
            raise RuntimeError("a bug inside backfill")
        return await real_send(endpoint, body, **kw)

    engine.send = send  # type: ignore[method-assign]
    ids = [f"r{i}" for i in range(12)]
    texts = {cid: ("#boom" if cid == "r5" else cid) for cid in ids}

    async def main() -> None:
        async with rig.service.background():
            batch_id = await rig.submit([chat_line(cid, texts[cid]) for cid in ids])
            batch = await rig.wait_done(batch_id)
            assert batch.status is BatchStatus.COMPLETED
            outcome = await rig.outcome(batch_id)
        check_invariant(outcome, ids)
        assert outcome.error_code("r5") == "internal_error"
        assert len(outcome.output) == 11

    with caplog.at_level(logging.ERROR, logger="backfill.worker"):
        run(main())
    assert any(r.exc_info and "a bug inside backfill" in str(r.exc_info[1]) for r in caplog.records)


def _nested(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels):
        value = {"a": value}
    return value


def _depth(value: Any) -> int:
    depth = 0
    while isinstance(value, dict) and "a" in value:
        value, depth = value["a"], depth + 1
    return depth


def test_deeply_nested_lines_and_answers(rig_factory: Any) -> None:
    """A line nested 300 levels deep (the JSON writer stops at 254) and an answer nested 600
    levels deep each get exactly one real outcome."""
    rig = rig_factory()
    lines = [
        chat_line("deep-line", "deep line", metadata=_nested(300)),
        chat_line("deep-answer", "#deep:600"),
        chat_line("plain", "plain"),
    ]

    async def main() -> None:
        async with rig.service.background():
            batch_id = await rig.submit(lines)
            batch = await rig.wait_done(batch_id)
            assert batch.status is BatchStatus.COMPLETED
            outcome = await rig.outcome(batch_id)
        check_invariant(outcome, ["deep-line", "deep-answer", "plain"])
        by_id = outcome.by_id()
        answer = by_id["deep-answer"]["response"]
        assert answer["status_code"] == 200
        assert _depth(answer["body"]["nested"]) == 600
        assert by_id["deep-line"]["response"]["status_code"] == 200

    run(main())


@pytest.mark.parametrize("kind", ["html", "empty", "truncated", "array"])
def test_upstream_200_with_a_bad_body_is_a_failed_attempt(
    rig_factory: Any, upstream: UpstreamProcess, kind: str
) -> None:
    rig = rig_factory()
    always, once = f"always #{kind}", f"once #{kind}:1"
    lines = [chat_line("always", always), chat_line("once", once), chat_line("ok", "ok")]

    async def main() -> None:
        async with rig.service.background():
            batch_id = await rig.submit(lines)
            batch = await rig.wait_done(batch_id)
            assert batch.status is BatchStatus.COMPLETED
            outcome = await rig.outcome(batch_id)
        check_invariant(outcome, ["always", "once", "ok"])
        assert outcome.error_code("always") == "invalid_upstream_response"
        assert {line["custom_id"] for line in outcome.output} == {"once", "ok"}
        stats = upstream.stats()["by_text"]
        assert stats[always] >= 3  # retried up to the model's attempts
        assert stats[once] >= 2

    run(main())


def test_error_lines_name_no_upstream_address(tmp_path: Path) -> None:
    """A model whose upstream refuses connections: the error lines say so without its
    address."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections are refused
    url = f"http://127.0.0.1:{port}/v1"
    rig = Rig(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", url, model={"attempts": 1})

    async def main() -> None:
        async with rig.service.background():
            batch_id = await rig.submit([chat_line("a", "a"), chat_line("b", "b")])
            await rig.wait_done(batch_id)
            outcome = await rig.outcome(batch_id)
        check_invariant(outcome, ["a", "b"])
        for line in outcome.errors:
            text = json.dumps(line)
            assert line["error"]["code"] == "upstream_unavailable"
            assert "127.0.0.1" not in text and str(port) not in text, text

    try:
        run(main())
    finally:
        rig.close()


def test_cancel_stops_sending_at_once(rig_factory: Any, upstream: UpstreamProcess) -> None:
    """max_concurrency 4, each request taking 2 s: after the cancel, the upstream receives
    nothing new; the 4 at the engine may finish; the rest are `batch_cancelled`."""
    rig = rig_factory(model={"max_concurrency": 4}, cancel_grace_seconds=10.0)
    upstream.reset()
    ids = [f"c{i}" for i in range(40)]

    async def main() -> None:
        async with rig.service.background():
            batch_id = await rig.submit([chat_line(cid, f"{cid} #sleep:2000") for cid in ids])
            await poll_async(lambda: upstream.stats()["requests"] >= 4)
            sent_at_cancel = upstream.stats()["requests"]
            rig.store.transition(
                batch_id,
                [BatchStatus.IN_PROGRESS],
                BatchStatus.CANCELLING,
                cancelling_at=int(rig.settings_clock()),
            )
            batch = await rig.wait_done(batch_id)
            assert batch.status is BatchStatus.CANCELLED
            outcome = await rig.outcome(batch_id)
            sent = upstream.stats()["requests"]
        check_invariant(outcome, ids)
        assert sent == sent_at_cancel, f"{sent - sent_at_cancel} requests sent after the cancel"
        assert len(outcome.output) == sent_at_cancel  # those at the engine finished
        codes = {outcome.error_code(cid) for cid in ids} - {None}
        assert codes == {"batch_cancelled"}

    run(main())


def test_a_shard_finished_with_missing_lines_runs_them_again(rig_factory: Any) -> None:
    """A checkpoint that the store dropped without saying so (the worst case the invariant
    guards against): the scheduler sees the shard's outcomes fall short of its lines and runs
    the missing requests again instead of finalizing with holes."""
    rig = rig_factory(flush_every_requests=3)
    inner = rig.store._inner
    dropped: list[int] = []
    real_record = inner.record_segment

    def lossy_record(segment: Any, token: str) -> bool:
        if not dropped:
            dropped.append(segment.completed + segment.failed)
            return True  # lies: nothing was recorded
        return bool(real_record(segment, token))

    rig.store.record_segment = lossy_record
    ids = [f"r{i}" for i in range(20)]

    async def main() -> None:
        async with rig.service.background():
            batch_id = await rig.submit([chat_line(cid, cid) for cid in ids])
            batch = await rig.wait_done(batch_id)
            assert batch.status is BatchStatus.COMPLETED
            outcome = await rig.outcome(batch_id)
        check_invariant(outcome, ids)
        assert len(outcome.output) == 20

    run(main())
    assert dropped and dropped[0] > 0
