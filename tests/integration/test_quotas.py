"""Project quotas against the shared real `backfill serve`, set with the real CLI
(`backfill projects set`) while the server runs: no restart between a change and its effect.

- Enqueued tokens: project A, at its limit with a slow batch in progress, gets its next batch
  `failed` with `token_limit_exceeded` and OpenAI's message while project B's batches run; once
  A's slow batch finishes, the same batch passes.
- Active batches: one more than the cap is refused at create (429, not retried by the SDK).
- Real-time limits: a project's requests per minute, lowered then raised, apply within the
  settings' cache time.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import openai
import pytest
from openai import OpenAI
from polling import poll
from sdk_helpers import chat_line, submit, wait_batch
from suite_settings import CLI

from backfill.testing.server import BackfillProcess

#: every line is counted as its bytes / 4 plus its max_tokens: a 2-line batch ~2,050 tokens
OUT = 1000
LIMIT = 3000


def projects_cli(server: BackfillProcess, *args: str) -> str:
    out = subprocess.run(
        [*CLI, "projects", *args, "--data-dir", str(server.data_dir)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.stdout


def lines(tag: str, content: str = "hello") -> list[dict[str, object]]:
    return [chat_line(f"{tag}-{i}", content, max_tokens=OUT) for i in range(2)]


def test_enqueued_token_limit_per_project(
    server: BackfillProcess, new_project: Callable[[str], OpenAI]
) -> None:
    a, b = new_project("quota-a"), new_project("quota-b")
    projects_cli(server, "set", "quota-a", "--token-limit", f"m={LIMIT}")
    projects_cli(server, "set", "quota-b", "--token-limit", f"m={LIMIT}")

    slow = submit(a, lines("slow", "take your time #sleep:4000"))
    slow = wait_batch(a, slow.id, {"in_progress"})
    listed = projects_cli(server, "list")
    assert any(row.startswith("quota-a") and f"/{LIMIT:,}" in row for row in listed.splitlines()), (
        listed
    )

    refused = wait_batch(a, submit(a, lines("refused")).id)
    assert refused.status == "failed", refused
    assert refused.errors is not None and refused.errors.data is not None
    [error] = refused.errors.data
    assert error.code == "token_limit_exceeded"
    assert error.message == (
        f"Enqueued token limit reached for m in project quota-a. Limit: {LIMIT:,} enqueued "
        "tokens. Please try again once some in_progress batches have been completed."
    )
    assert error.line is None

    # the other project's batches run meanwhile, under the same limit of their own
    for n in range(2):
        other = wait_batch(b, submit(b, lines(f"b{n}")).id)
        assert other.status == "completed", other
    assert a.batches.retrieve(slow.id).status == "in_progress"  # A still at its limit

    assert wait_batch(a, slow.id).status == "completed"
    passed = wait_batch(a, submit(a, lines("after")).id)
    assert passed.status == "completed", passed  # the limit freed as the batch finished


def test_active_batch_cap_at_create(
    server: BackfillProcess, new_project: Callable[[str], OpenAI]
) -> None:
    c = new_project("quota-active")
    projects_cli(server, "set", "quota-active", "--max-active-batches", "1")
    slow = submit(c, [chat_line("s", "wait #sleep:1500")])
    with pytest.raises(openai.RateLimitError) as refused:
        submit(c, [chat_line("t", "one too many")])
    assert refused.value.status_code == 429
    assert refused.value.code == "active_batch_limit_exceeded"
    assert refused.value.response.headers.get("x-should-retry") == "false"
    assert wait_batch(c, slow.id).status == "completed"
    assert wait_batch(c, submit(c, [chat_line("u", "now fits")]).id).status == "completed"
    projects_cli(server, "set", "quota-active", "--max-active-batches", "none")


def test_realtime_limit_changes_without_restart(
    server: BackfillProcess, new_project: Callable[[str], OpenAI]
) -> None:
    rt = new_project("quota-realtime").with_options(max_retries=0)
    projects_cli(server, "set", "quota-realtime", "--realtime-rpm", "1")

    def ask() -> str:
        try:
            rt.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        except openai.RateLimitError:
            return "limited"
        return "ok"

    # within the settings' cache time the new limit holds: one a minute, then 429
    poll(lambda: [ask(), ask()], lambda got: got[-1] == "limited", what="rpm 1 to apply")
    projects_cli(server, "set", "quota-realtime", "--realtime-rpm", "6000")
    poll(
        lambda: [ask() for _ in range(5)],
        lambda got: got == ["ok"] * 5,
        what="rpm 6000 to apply",
    )
