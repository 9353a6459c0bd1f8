"""The usage and cost reports through the real server: a batch run through the echo upstream
lands in the ledger (written with its result segments), and `/v1/organization/usage/...`
reports exactly the usage of its output lines, in OpenAI's schema, to the project's own key
and to an admin key made by the real CLI; another project's key sees none of it."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2 as httpx
import jsonschema
from openai import OpenAI
from polling import poll
from sdk_helpers import chat_line, embedding_line, read_jsonl, run_batch
from suite_settings import CLI

from backfill.testing.server import BackfillProcess

SPEC = json.loads((Path(__file__).parents[1] / "support" / "openai_usage_schemas.json").read_text())


def check_spec(body: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(
        {**SPEC, "$ref": "#/components/schemas/UsageResponse"}
    ).validate(body)


def admin_key(data_dir: Path, project: str) -> str:
    out = subprocess.run(
        [*CLI, "keys", "create", "--admin", "--project", project, "--data-dir", str(data_dir)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout.startswith("Created an admin API key"), out.stdout + out.stderr
    return out.stdout.split()[-1]


def report(server: BackfillProcess, key: str, path: str, **params: Any) -> dict[str, Any]:
    r = httpx.get(
        f"{server.base_url}/organization/{path}",
        params=params,
        headers={"authorization": f"Bearer {key}"},
        timeout=15,
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    check_spec(body)
    return body


def results(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [res for bucket in body["data"] for res in bucket["results"]]


def test_batch_usage_reported_exactly(
    server: BackfillProcess, new_project: Callable[[str], OpenAI], client_b: OpenAI
) -> None:
    name = f"usage-{uuid.uuid4().hex[:8]}"
    client = new_project(name)
    start = int(time.time()) - 1
    chat = run_batch(client, [chat_line(f"c{i}", f"hello number {i} " * (i + 1)) for i in range(5)])
    emb = run_batch(
        client, [embedding_line(f"e{i}", "some words " * i) for i in range(1, 4)], "/v1/embeddings"
    )
    assert (chat.status, emb.status) == ("completed", "completed")
    assert chat.output_file_id is not None and emb.output_file_id is not None
    lines = read_jsonl(client, chat.output_file_id)
    usage = [line["response"]["body"]["usage"] for line in lines]
    want = (
        sum(u["prompt_tokens"] for u in usage),
        sum(u["completion_tokens"] for u in usage),
        len(usage),
    )
    emb_usage = [
        line["response"]["body"]["usage"] for line in read_jsonl(client, emb.output_file_id)
    ]
    emb_want = (sum(u["prompt_tokens"] for u in emb_usage), len(emb_usage))

    key = client.api_key
    params = {"start_time": start, "bucket_width": "1h", "group_by": ["batch", "model"]}

    def completions(k: str = key, **extra: Any) -> list[dict[str, Any]]:
        return results(report(server, k, "usage/completions", **params, **extra))

    got = poll(completions, lambda rs: sum(r["num_model_requests"] for r in rs) >= 5,
               what="the batch's ledger entries")  # fmt: skip
    [only] = got
    assert (only["input_tokens"], only["output_tokens"], only["num_model_requests"]) == want
    assert (only["batch"], only["model"], only["input_cached_tokens"]) == (True, "m", 0)

    [e] = results(report(server, key, "usage/embeddings", start_time=start, bucket_width="1h"))
    assert (e["input_tokens"], e["num_model_requests"]) == emb_want

    # an admin key sees every project; filtered to this one it sees the same figures
    admin = admin_key(server.data_dir, f"ops-{name}")
    grouped = results(
        report(server, admin, "usage/completions", start_time=start, group_by="project_id",
               bucket_width="1h")
    )  # fmt: skip
    mine = [r for r in grouped if r["num_model_requests"] == 5 and r["input_tokens"] == want[0]]
    assert len(mine) == 1, grouped
    project_id = mine[0]["project_id"]
    [filtered] = completions(admin, project_ids=[project_id])
    assert (filtered["input_tokens"], filtered["output_tokens"]) == want[:2]
    # another project's key, asking for this project by id, gets nothing
    assert completions(client_b.api_key, project_ids=[project_id]) == []
    # costs: a page of day buckets in OpenAI's shape (unpriced models cost nothing)
    costs = report(server, key, "costs", start_time=start, group_by="line_item")
    assert costs["object"] == "page" and len(costs["data"]) == 1
