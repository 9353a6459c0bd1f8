"""Cancel keeps what finished and gives the rest `batch_cancelled` lines; finished batches 409."""

from __future__ import annotations

from openai import ConflictError, OpenAI
from polling import poll
from sdk_helpers import chat_line, read_jsonl, run_batch, submit, wait_batch

SLOW = "#sleep:30000"  # far longer than the test: these can only end by being cancelled


def test_cancel_keeps_finished_results(client: OpenAI) -> None:
    lines = []
    fast_ids, slow_ids = [], []
    for i in range(9):
        if i % 2 == 0:
            fast_ids.append(f"fast-{i}")
            lines.append(chat_line(f"fast-{i}", f"quick {i}"))
        else:
            slow_ids.append(f"slow-{i}")
            lines.append(chat_line(f"slow-{i}", f"slow {i} {SLOW}"))
    batch = submit(client, lines)

    running = poll(
        lambda: client.batches.retrieve(batch.id),
        lambda b: b.request_counts is not None and b.request_counts.completed == len(fast_ids),
        what="the fast requests to be recorded",
    )
    assert running.status == "in_progress"
    assert running.request_counts is not None
    assert running.request_counts.total == 9
    assert running.request_counts.failed == 0

    cancelling = client.batches.cancel(batch.id)
    assert cancelling.id == batch.id
    assert cancelling.status == "cancelling"
    assert cancelling.cancelling_at is not None
    # cancelling again is harmless and returns the batch as it is
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")

    done = wait_batch(client, batch.id, timeout=20)
    assert done.status == "cancelled", done
    assert done.cancelled_at is not None and done.cancelling_at is not None
    assert done.cancelling_at <= done.cancelled_at
    assert done.completed_at is None
    assert done.request_counts is not None
    counts = done.request_counts
    assert counts.total == 9
    assert counts.completed == len(fast_ids)
    assert counts.failed == len(slow_ids)
    assert counts.completed + counts.failed == counts.total

    assert done.output_file_id is not None and done.error_file_id is not None
    output = read_jsonl(client, done.output_file_id)
    errors = read_jsonl(client, done.error_file_id)
    assert [o["custom_id"] for o in output] == fast_ids
    for o in output:
        assert o["response"]["status_code"] == 200
        assert o["error"] is None
    assert [e["custom_id"] for e in errors] == slow_ids
    for e in errors:
        assert e["id"].startswith("batch_req_")
        assert e["response"] is None
        assert e["error"]["code"] == "batch_cancelled"
        assert e["error"]["message"]
    every = [o["custom_id"] for o in output] + [e["custom_id"] for e in errors]
    assert sorted(every) == sorted(fast_ids + slow_ids)

    # a cancelled batch is terminal: cancelling it again changes nothing
    again = client.batches.cancel(batch.id)
    assert again.status == "cancelled"


def test_cancel_of_completed_batch_is_409_not_retried(client: OpenAI) -> None:
    batch = run_batch(client, [chat_line("done", "finished")])
    assert batch.status == "completed"

    try:
        client.batches.with_raw_response.cancel(batch.id)
    except ConflictError as exc:
        err = exc
    else:
        raise AssertionError("cancel of a completed batch succeeded")
    assert err.status_code == 409
    assert err.response.headers["x-should-retry"] == "false"
    assert err.response.headers["x-request-id"]
    body = err.response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert "completed" in body["message"]
    assert client.batches.retrieve(batch.id).status == "completed"


def test_cancel_unknown_batch_is_404(client: OpenAI) -> None:
    from openai import NotFoundError

    try:
        client.batches.cancel("batch_doesnotexist")
    except NotFoundError as exc:
        assert exc.status_code == 404
    else:
        raise AssertionError("expected 404")
