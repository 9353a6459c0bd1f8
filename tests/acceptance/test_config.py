"""A TOML config file and `--model NAME=URL#UPSTREAM`: renaming, upstream keys, attempts."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from acceptance_settings import FAST_ENV
from openai import OpenAI
from sdk_helpers import chat_line, read_jsonl, run_batch

from backfill.testing import UpstreamProcess, start_upstream
from backfill.testing.server import BackfillProcess

KEY = "sk-from-toml"
UPSTREAM_KEY = "secret"


@pytest.fixture(scope="module")
def secured() -> Iterator[UpstreamProcess]:
    """An upstream that answers 401 without `Authorization: Bearer secret`."""
    with start_upstream(api_key=UPSTREAM_KEY) as up:
        yield up


@pytest.fixture
def configured(
    tmp_path: Path,
    secured: UpstreamProcess,
    upstream: UpstreamProcess,
    servers: list[BackfillProcess],
) -> OpenAI:
    config = tmp_path / "backfill.toml"
    config.write_text(
        f"""
[server]
api_keys = ["{KEY}"]
scheduler_interval = 0.1
flush_every_seconds = 0.1

[models.alias]
url = "{secured.url}"
upstream_name = "real-name"
api_key_env = "UPSTREAM_KEY"

[models.keyless]
url = "{secured.url}"
attempts = 3

[models.fragile]
url = "{secured.url}"
api_key_env = "UPSTREAM_KEY"
attempts = 2
"""
    )
    proc = BackfillProcess(
        tmp_path / "data",
        models=[f"cli-alias={upstream.url}#cli-real-name"],
        extra_args=["--config", str(config)],
        env={**FAST_ENV, "UPSTREAM_KEY": UPSTREAM_KEY},
    )
    servers.append(proc)
    proc.start()
    return OpenAI(base_url=proc.base_url, api_key=KEY, max_retries=1, timeout=15.0)


def test_toml_models_rename_and_authenticate(configured: OpenAI, secured: UpstreamProcess) -> None:
    assert sorted(m.id for m in configured.models.list()) == [
        "alias",
        "cli-alias",
        "fragile",
        "keyless",
    ]

    batch = run_batch(configured, [chat_line(f"r{i}", f"hi {i}", model="alias") for i in range(3)])
    assert batch.status == "completed", batch
    assert batch.model == "alias"  # the public name, not the upstream's
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (3, 0)
    assert batch.output_file_id is not None
    out = read_jsonl(configured, batch.output_file_id)
    assert [o["custom_id"] for o in out] == ["r0", "r1", "r2"]
    for o in out:
        assert o["response"]["status_code"] == 200
        assert o["response"]["body"]["model"] == "real-name"  # the upstream echoes body.model

    # the same upstream without the key: 401, final (not retried), in the error file
    text = f"no key {uuid.uuid4().hex}"
    denied = run_batch(configured, [chat_line("denied", text, model="keyless")])
    assert denied.status == "completed", denied
    assert denied.output_file_id is None
    assert denied.error_file_id is not None
    (line,) = read_jsonl(configured, denied.error_file_id)
    assert line["response"]["status_code"] == 401
    assert line["response"]["body"]["error"]["code"] == "invalid_api_key"


def test_toml_attempts_bound_retries(configured: OpenAI, secured: UpstreamProcess) -> None:
    text = f"always failing {uuid.uuid4().hex} #fail500"
    batch = run_batch(configured, [chat_line("x", text, model="fragile")])
    assert batch.status == "completed", batch
    assert batch.error_file_id is not None
    (line,) = read_jsonl(configured, batch.error_file_id)
    assert line["response"]["status_code"] == 500
    assert secured.stats()["by_text"][text] == 2  # attempts = 2


def test_cli_model_spec_renames(configured: OpenAI) -> None:
    batch = run_batch(configured, [chat_line("c", "from the cli", model="cli-alias")])
    assert batch.status == "completed", batch
    assert batch.model == "cli-alias"
    assert batch.output_file_id is not None
    (line,) = read_jsonl(configured, batch.output_file_id)
    assert line["response"]["body"]["model"] == "cli-real-name"
    assert line["response"]["body"]["choices"][0]["message"]["content"] == "echo: from the cli"
