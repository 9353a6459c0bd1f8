"""`backfill usage` and `backfill keys create --admin` on a real SQLite store in a data dir:
the ledger's figures as a table and as JSON, worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli_server import run_cli

from backfill.cli.usage import parse_time
from backfill.domain.usage import BATCH, REALTIME, UsageEntry
from backfill.store import open_store

T0 = 1_700_000_000


def ledger(data_dir: Path) -> None:
    store = open_store(f"sqlite:///{data_dir / 'backfill.db'}")
    store.migrate()
    a = store.ensure_project("alpha")
    b = store.ensure_project("beta")
    entries = [
        UsageEntry("1", BATCH, a.id, "llama", "/v1/chat/completions", T0 + 10, requests=2,
                   input_tokens=100, cached_tokens=40, output_tokens=30, engine_ms=1500,
                   cost_micros=500, list_micros=1000, currency="USD"),
        UsageEntry("2", REALTIME, b.id, "llama", "/v1/chat/completions", T0 + 20, requests=1,
                   input_tokens=10, output_tokens=20, engine_ms=500, cost_micros=300,
                   list_micros=300, currency="USD"),
        UsageEntry("3", BATCH, a.id, "minilm", "/v1/embeddings", T0 + 30, requests=4,
                   input_tokens=16),  # unpriced
        UsageEntry("4", BATCH, a.id, "llama", "/v1/chat/completions", T0 + 7200, requests=9),
    ]  # fmt: skip
    for e in entries:
        store.record_usage(e)
    store.close()


def test_usage_by_project_and_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    ledger(tmp_path)
    window = ["--since", str(T0), "--until", str(T0 + 3600), "--data-dir", str(tmp_path)]
    code, out, err = run_cli(capsys, "usage", "--by", "project,model", "--json", *window)
    assert code == 0, err
    got = json.loads(out)
    rows = [(r["project"], r["model"], r["requests"], r["input_tokens"], r["cost"]) for r in
            got["rows"]]  # fmt: skip
    assert rows == [
        ("alpha", "llama", 2, 100, {"USD": 0.0005}),
        ("alpha", "minilm", 4, 16, {}),
        ("beta", "llama", 1, 10, {"USD": 0.0003}),
    ]
    total = got["total"]
    # entry 4 is past --until
    assert (total["requests"], total["input_tokens"], total["cached_tokens"]) == (7, 126, 40)
    assert (total["output_tokens"], total["engine_seconds"]) == (50, 2.0)
    assert (total["cost"], total["realtime_cost"]) == ({"USD": 0.0008}, {"USD": 0.0013})

    code, out, _ = run_cli(capsys, "usage", "--by", "batch", *window)
    assert code == 0
    lines = out.splitlines()
    assert lines[1].split() == ["BATCH", "REQUESTS", "INPUT", "CACHED", "OUTPUT", "ENGINE_S",
                                "COST", "REALTIME_COST"]  # fmt: skip
    assert lines[2].split() == ["batch", "6", "116", "40", "30", "1.5", "0.000500", "USD",
                                "0.001000", "USD"]  # fmt: skip
    assert lines[3].split()[:2] == ["realtime", "1"]
    assert lines[4].split()[:3] == ["TOTAL", "7", "126"]


def test_default_until_counts_the_current_second(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # now is entry 3's second: without --until it is counted (an end of `now` left it out)
    ledger(tmp_path)
    monkeypatch.setattr("backfill.cli.usage.time.time", lambda: T0 + 30.5)
    code, out, err = run_cli(capsys, "usage", "--since", str(T0), "--json", "--data-dir",
                             str(tmp_path))  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["total"]["requests"] == 7


def test_usage_refuses_bad_options(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path)]
    assert run_cli(capsys, "usage", "--by", "colour", *data)[0] == 2
    assert run_cli(capsys, "usage", "--since", "yesterday", *data)[0] == 2
    assert run_cli(capsys, "usage", "--since", "1d", "--until", "2d", *data)[0] == 2


def test_times() -> None:
    assert parse_time("7d", 1_000_000) == 1_000_000 - 7 * 86400
    assert parse_time("90m", 10_000) == 10_000 - 5400
    assert parse_time("2023-11-14", 0) == 1_699_920_000
    assert parse_time("2023-11-14T22:13:20+00:00", 0) == T0
    assert parse_time(str(T0), 0) == T0


def test_admin_keys(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path)]
    code, out, _ = run_cli(capsys, "keys", "create", "--admin", *data)
    assert code == 0 and out.startswith("Created an admin API key for project admin: sk-bf-")
    assert run_cli(capsys, "keys", "create", "--project", "team", *data)[0] == 0
    assert run_cli(capsys, "keys", "create", *data)[0] == 2  # neither --project nor --admin
    code, out, _ = run_cli(capsys, "keys", "list", *data)
    rows = [line.split() for line in out.splitlines()]
    assert rows[0][3] == "ADMIN"
    assert sorted((r[2], r[3]) for r in rows[1:]) == [("admin", "yes"), ("team", "-")]
