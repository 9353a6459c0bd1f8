"""Scale-out on PostgreSQL: two `backfill serve --no-worker` API processes and three
`backfill worker` processes on one database and one shared blob folder.

A 5,000-request batch is created through one API and watched through the other. What must
hold: no request lost (the output holds exactly the input's custom_ids), none duplicated (each
custom_id once in the output, each request text sent to the upstream exactly once, each result
recorded in exactly one segment), and the work spread over the workers: `Segment.owner` says
which worker recorded what (the rows stay after finalization; only segment *blobs* go).

Skipped unless `BACKFILL_TEST_POSTGRES_URL` points at a server; a scratch database is created
for the test and dropped afterwards, as in `tests/contract/conftest.py`.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from acceptance_settings import FAST_ENV
from durability import TaggedBatch, assert_exactly_once, client_for, write_config
from polling import poll
from sdk_helpers import submit

from backfill.store.sql import SqlStore
from backfill.testing import UpstreamProcess
from backfill.testing.server import BackfillProcess

PG_ENV = "BACKFILL_TEST_POSTGRES_URL"
KEY = "sk-acceptance-scaleout"


def _libpq(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """An empty, migrated scratch database `bf_accept_<random>`, dropped afterwards."""
    admin = os.environ.get(PG_ENV)
    if not admin:
        pytest.skip(f"{PG_ENV} is not set")
    psycopg = pytest.importorskip("psycopg")
    from sqlalchemy.engine import make_url

    name = f"bf_accept_{secrets.token_hex(6)}"
    with psycopg.connect(_libpq(admin), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(_libpq(admin)).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with psycopg.connect(_libpq(admin), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_two_apis_three_workers_on_postgres(
    tmp_path: Path,
    postgres_url: str,
    upstream: UpstreamProcess,
    servers: list[BackfillProcess],
) -> None:
    config = write_config(tmp_path / "backfill.toml", upstream, max_concurrency=32)
    shared = [
        "--config",
        str(config),
        "--database",
        postgres_url,
        "--storage",
        str(tmp_path / "blobs"),
    ]
    env = {
        **FAST_ENV,
        "BACKFILL_SHARD_SIZE": "250",  # 20 shards for 3 workers x 2 shards at once
        "BACKFILL_WORKER_SHARDS": "2",
        "BACKFILL_FLUSH_EVERY_REQUESTS": "100",
        "BACKFILL_LEASE_SECONDS": "10",  # no kills here: a stalled heartbeat must not re-run work
    }
    apis = [
        BackfillProcess(
            tmp_path / f"api{i}", api_keys=[KEY], extra_args=[*shared, "--no-worker"], env=env
        )
        for i in range(2)
    ]
    servers.extend(apis)
    with ThreadPoolExecutor(2) as pool:  # both migrate and add the key at once
        list(pool.map(lambda p: p.start(), apis))
    workers = [
        BackfillProcess(tmp_path / f"worker{i}", extra_args=shared, env=env, command="worker")
        for i in range(3)
    ]
    servers.extend(workers)
    for w in workers:
        w.start()

    creator, watcher = (client_for(api.base_url, KEY) for api in apis)
    work = TaggedBatch(5000)
    batch = submit(creator, work.lines())
    done = poll(
        lambda: watcher.batches.retrieve(batch.id),
        lambda b: (
            b.status in {"completed", "failed", "expired", "cancelled"}
            or any(w.proc is not None and w.proc.poll() is not None for w in workers)
        ),
        timeout=120,
        interval=0.2,
        what=f"batch {batch.id} to finish",
    )
    assert all(w.proc is not None and w.proc.poll() is None for w in workers), [
        w.logs() for w in workers
    ]
    assert_exactly_once(watcher, done, work.ids)
    assert creator.batches.retrieve(batch.id) == done  # both APIs tell the same story

    seen = work.seen(upstream)
    assert len(seen) == work.n and set(seen.values()) == {1}  # each request sent once

    store = SqlStore(postgres_url)
    try:
        segments = store.segments(batch.id)
    finally:
        store.close()
    per_owner: dict[str, int] = {}
    for seg in segments:
        assert seg.owner is not None and seg.owner.startswith("worker-")
        per_owner[seg.owner] = per_owner.get(seg.owner, 0) + seg.completed + seg.failed
    print(f"\npostgres scale-out: results recorded per worker {per_owner}")
    assert sum(per_owner.values()) == work.n  # every result recorded exactly once
    assert len(per_owner) >= 2  # ideally 3; two is what a loaded 2-core CI machine guarantees
