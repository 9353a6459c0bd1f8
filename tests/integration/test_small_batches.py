"""Many small batches run side by side: a worker's shard count follows the model's room.

Twelve one-request batches whose requests each take 1.5 s at the real echo upstream are
created at once; while they run, the server's `/v1/dashboard/models` is read over and over,
and the batch requests in flight for the model must go past 4 (the fixed `worker_shards`
that ran such batches four at a time). No timing is asserted: the concurrency is observed.
"""

from __future__ import annotations

import json
import time
import urllib.request

from openai import OpenAI
from sdk_helpers import chat_line, read_jsonl, submit, wait_batch
from suite_settings import KEY_A

from backfill.testing.server import BackfillProcess

MODEL = "m2"


def batch_in_flight(server: BackfillProcess) -> int:
    req = urllib.request.Request(
        server.base_url + "/dashboard/models", headers={"Authorization": f"Bearer {KEY_A}"}
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        listed = json.loads(resp.read())
    for model in listed["data"]:
        if model["id"] == MODEL:
            return int((model.get("batch") or {}).get("in_flight", 0))
    raise AssertionError(f"{MODEL} not listed: {listed}")


def test_one_request_batches_run_at_once(client: OpenAI, server: BackfillProcess) -> None:
    batches = [
        submit(client, [chat_line(f"s{n}", f"small {n} #sleep:1500", model=MODEL)])
        for n in range(12)
    ]
    seen = 0
    deadline = time.monotonic() + 60
    while seen < 12 and time.monotonic() < deadline:
        seen = max(seen, batch_in_flight(server))
        if client.batches.retrieve(batches[-1].id).status in ("completed", "failed"):
            break  # the last one created is done: the others were leased before it
        time.sleep(0.05)
    assert seen > 4, f"at most {seen} requests of 12 one-request batches were in flight at once"
    for n, batch in enumerate(batches):
        done = wait_batch(client, batch.id)
        assert done.status == "completed", done
        assert done.output_file_id is not None
        assert [o["custom_id"] for o in read_jsonl(client, done.output_file_id)] == [f"s{n}"]
