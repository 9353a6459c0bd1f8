"""Output order is input order even when later shards finish first; batches run side by side."""

from __future__ import annotations

from openai import OpenAI
from sdk_helpers import chat_line, read_jsonl, submit, wait_batch


def test_output_in_input_order_when_early_shards_are_slow(client: OpenAI) -> None:
    # shards are 3 requests: make the first shard the slowest and the last the fastest
    ids = [f"o{i:02d}" for i in range(12)]
    delays = [600, 500, 400, 300, 200, 100, 0, 0, 0, 0, 0, 0]
    lines = [chat_line(c, f"{c} #sleep:{d}" if d else c) for c, d in zip(ids, delays, strict=True)]
    batch = wait_batch(client, submit(client, lines).id)
    assert batch.status == "completed", batch
    assert batch.output_file_id is not None
    out = read_jsonl(client, batch.output_file_id)
    assert [o["custom_id"] for o in out] == ids


def test_batches_run_side_by_side(client: OpenAI, client_b: OpenAI) -> None:
    made = []
    for n, who in enumerate([client, client_b, client, client_b]):
        lines = [chat_line(f"b{n}-{i}", f"batch {n} line {i}") for i in range(5)]
        made.append((who, submit(who, lines), n))
    for who, batch, n in made:
        done = wait_batch(who, batch.id)
        assert done.status == "completed", done
        assert done.output_file_id is not None
        out = read_jsonl(who, done.output_file_id)
        assert [o["custom_id"] for o in out] == [f"b{n}-{i}" for i in range(5)]
        contents = [o["response"]["body"]["choices"][0]["message"]["content"] for o in out]
        assert contents == [f"echo: batch {n} line {i}" for i in range(5)]
