"""Real-time requests in the usage ledger (`domain/usage.py`): one entry per gateway request
that reached the engine and ended, priced at the full (real-time) price.

Recording never fails or delays the client's answer: the entry is written after the answer
(a whole one: as the response's background task, once its bytes are sent; a stream: from a
task started when the relay ends), through the store's own thread lane (`api/responses.call`).
A store failure is logged and counted (`unrecorded`), never raised to the client. The ref is a
fresh id minted per request (`rt:<uuid>`), not the client's `x-request-id`, which a client may
repeat.

Usage comes from the answer's `usage` (chat, completions, embeddings, responses); a stream's
from its last event carrying a non-null `usage` (vLLM sends one with `stream_options:
{"include_usage": true}`; a responses stream in `response.completed`). A stream without one
records its request and engine time with zero tokens: the gateway does not ask for usage the
client did not ask for, as that would add an event to the client's stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections import Counter

import orjson

from backfill.api.responses import call
from backfill.domain.pricing import PriceTable
from backfill.domain.records import Project, Usage
from backfill.domain.results import usage_from_body
from backfill.domain.usage import realtime_usage
from backfill.metrics import Family as MetricFamily
from backfill.settings import Settings
from backfill.store.base import Store

log = logging.getLogger("backfill.api")

_EVENT_END = re.compile(rb"\r?\n\r?\n")
_NO_USAGE = re.compile(rb'"usage"\s*:\s*null')
#: an event bigger than this is not read for usage (a responses stream's last event repeats
#: the whole answer; past this it is not kept)
MAX_EVENT_BYTES = 8 << 20


class RealtimeLedger:
    def __init__(self, settings: Settings, store: Store) -> None:
        self._store = store
        self._prices = PriceTable.from_config(settings.prices, settings.batch_discount)
        self._tasks: set[asyncio.Task[None]] = set()
        #: per model: entries written, and entries lost to store failures (logged); on
        #: `/metrics` as `backfill_realtime_ledger_recorded_total` / `_unrecorded_total`
        self.recorded: Counter[str] = Counter()
        self.unrecorded: Counter[str] = Counter()

    async def record(
        self,
        project: Project,
        model: str,
        endpoint: str,
        usage: Usage,
        engine_seconds: float,
        at: int,
    ) -> None:
        """Write one request's entry; never raises (a failure is logged and counted)."""
        entry = realtime_usage(
            uuid.uuid4().hex,
            project_id=project.id,
            api_key_id=project.key_id,
            model=model,
            endpoint=endpoint,
            at=at,
            usage=usage,
            engine_ms=round(engine_seconds * 1000),
            cost=self._prices.cost(model, usage, batch=False),
        )
        try:
            await call(self._store.record_usage, entry)
        except Exception as exc:
            self.unrecorded[model] += 1
            log.warning(
                "real-time usage of project %s (%s, %d+%d tokens) not recorded: %s: %s",
                project.id,
                model,
                usage.input_tokens,
                usage.output_tokens,
                type(exc).__name__,
                exc,
            )
        else:
            self.recorded[model] += 1

    def metric_families(self) -> list[MetricFamily]:
        return [
            MetricFamily(
                "backfill_realtime_ledger_recorded_total",
                "counter",
                "real-time requests written to the usage ledger",
                {m: float(n) for m, n in self.recorded.items()},
            ),
            MetricFamily(
                "backfill_realtime_ledger_unrecorded_total",
                "counter",
                "real-time requests whose ledger entry a store failure lost (logged)",
                {m: float(n) for m, n in self.unrecorded.items()},
            ),
        ]

    def record_soon(
        self,
        project: Project,
        model: str,
        endpoint: str,
        usage: Usage,
        engine_seconds: float,
        at: int,
    ) -> None:
        """`record` in a task of its own (the caller does not wait for it)."""
        task = asyncio.ensure_future(
            self.record(project, model, endpoint, usage, engine_seconds, at)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for the entries still being written (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def answer_usage(body: bytes) -> Usage:
    """The usage of a whole answer's body (none if it has none). Answers put `usage` last,
    so only the object after the last `"usage"` is parsed (an embeddings answer may be
    megabytes of numbers); the whole body only if that fails."""
    at = body.rfind(b'"usage"')
    if at < 0:
        return Usage()
    start = body.find(b"{", at)
    if start >= 0 and body[at + 7 : start].strip() == b":":
        depth = 0
        for end in range(start, min(len(body), start + 4096)):
            depth += {123: 1, 125: -1}.get(body[end], 0)  # { and }
            if depth == 0:
                with contextlib.suppress(orjson.JSONDecodeError):
                    return usage_from_body({"usage": orjson.loads(body[start : end + 1])})
                break
    try:
        return usage_from_body(orjson.loads(body))
    except orjson.JSONDecodeError:
        return Usage()


class StreamUsage:
    """Finds the usage of a stream as its bytes pass: the last event with a non-null one."""

    def __init__(self) -> None:
        self.usage = Usage()
        self._event = b""

    def feed(self, chunk: bytes) -> None:
        data = self._event + chunk
        start = 0
        for end in _EVENT_END.finditer(data):
            self._read(data[start : end.start()])
            start = end.end()
        rest = data[start:]
        self._event = rest if len(rest) <= MAX_EVENT_BYTES else b""

    def _read(self, event: bytes) -> None:
        if b'"usage"' not in event or _NO_USAGE.search(event):
            return
        for line in event.splitlines():
            if not line.startswith(b"data:"):
                continue
            try:
                body = orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                continue
            if isinstance(body, dict) and isinstance(body.get("response"), dict):
                body = body["response"]  # a responses stream's `response.completed`
            usage = usage_from_body(body)
            if usage != Usage():
                self.usage = usage
