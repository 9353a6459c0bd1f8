"""Prefix-aware planning and identical requests run once, through the real CLI (`backfill
serve`) against the echo upstream: a shuffled batch over a few shared system prompts with 30%
duplicate lines (temperature 0) gives every custom_id exactly once, in input order, while the
upstream is sent each distinct body once and sees the prefixes in groups; and a `kill -9`
in the middle of such a batch still gives every line exactly once.

The upstream's `/stats` `by_text` counts what it was sent per last-message text, in the order
it first saw each (a dict keeps insertion order): that order is the dispatch order.
"""

from __future__ import annotations

import itertools
import random
import uuid
from pathlib import Path
from typing import Any

from acceptance_settings import FAST_ENV
from durability import CRASH_ENV, assert_exactly_once, client_for, progress, wait_progress
from sdk_helpers import submit, wait_batch

from backfill.testing import UpstreamProcess
from backfill.testing.server import BackfillProcess

KEY = "sk-acceptance-prefix"
PREFIXES = 6


def workload(n: int, tag: str, seed: int) -> tuple[list[dict[str, Any]], int]:
    """(lines, distinct bodies): shuffled over `PREFIXES` shared system prompts, 30% copies."""
    rng = random.Random(seed)
    systems = [f"system prompt {k}: " + "context " * 300 for k in range(PREFIXES)]
    bodies: list[dict[str, Any]] = []
    for i in range(n - int(0.3 * n)):
        k = rng.randrange(PREFIXES)
        question = f"{tag} p{k} q{i} #sleep:2"
        bodies.append(
            {
                "model": "m",
                "messages": [
                    {"role": "system", "content": systems[k]},
                    {"role": "user", "content": question},
                ],
                "temperature": 0,
                "max_tokens": rng.choice([8, 64, 512]),
            }
        )
    distinct = len(bodies)
    bodies += [rng.choice(bodies[:distinct]) for _ in range(n - distinct)]
    rng.shuffle(bodies)
    lines = [
        {"custom_id": f"r{i:05d}", "method": "POST", "url": "/v1/chat/completions", "body": b}
        for i, b in enumerate(bodies)
    ]
    return lines, distinct


def seen(upstream: UpstreamProcess, tag: str) -> dict[str, int]:
    by_text: dict[str, int] = upstream.stats(timeout=30)["by_text"]
    return {t: c for t, c in by_text.items() if t.startswith(tag)}


def config(path: Path, upstream: UpstreamProcess) -> Path:
    path.write_text(f'[models.m]\nurl = "{upstream.url}"\nmax_concurrency = 16\n')
    return path


def test_shared_prefixes_and_duplicates_run_grouped_and_once(
    tmp_path: Path, upstream: UpstreamProcess, servers: list[BackfillProcess]
) -> None:
    tag = uuid.uuid4().hex[:10]
    lines, distinct = workload(600, tag, seed=16)
    env = {**FAST_ENV, "BACKFILL_SHARD_SIZE": "200", "BACKFILL_WORKER_SHARDS": "2"}
    proc = BackfillProcess(
        tmp_path / "data",
        api_keys=[KEY],
        extra_args=["--config", str(config(tmp_path / "b.toml", upstream))],
        env=env,
    )
    servers.append(proc)
    proc.start()
    client = client_for(proc.base_url, KEY)
    batch = submit(client, lines)
    done = wait_batch(client, batch.id, timeout=90)
    ids = [line["custom_id"] for line in lines]
    assert_exactly_once(client, done, ids)

    sent = seen(upstream, tag)
    assert sum(sent.values()) == distinct < len(lines)  # each distinct body once
    assert all(count == 1 for count in sent.values())
    # dispatch order: the prefixes come in groups, not shuffled (file order: ~500 switches)
    order = [text.split()[1] for text in sent]
    switches = sum(a != b for a, b in itertools.pairwise(order))
    assert switches <= 60, switches


def test_kill_9_mid_batch_with_planning_exactly_once(
    tmp_path: Path, upstream: UpstreamProcess, servers: list[BackfillProcess]
) -> None:
    tag = uuid.uuid4().hex[:10]
    lines, _ = workload(2000, tag, seed=17)
    cfg = config(tmp_path / "b.toml", upstream)
    data = tmp_path / "data"

    def start() -> BackfillProcess:
        proc = BackfillProcess(
            data, api_keys=[KEY], extra_args=["--config", str(cfg)], env={**FAST_ENV, **CRASH_ENV}
        )
        servers.append(proc)
        return proc.start()

    proc = start()
    client = client_for(proc.base_url, KEY)
    batch = submit(client, lines)
    now = wait_progress(
        client, batch.id, 700, lambda: proc.proc is not None and proc.proc.poll() is None
    )
    assert now.status == "in_progress", now
    proc.kill()
    killed_at = progress(now)
    proc = start()
    client = client_for(proc.base_url, KEY)
    done = wait_batch(client, batch.id, timeout=90)
    assert_exactly_once(client, done, [line["custom_id"] for line in lines])
    assert killed_at < len(lines)
