"""The usage ledger in `MemoryStore`, the twin of `sql_usage.py`: entries by `ref`, in
insertion order, under the store's one lock (`_insert_usage` is for callers holding it)."""

from __future__ import annotations

import threading
from dataclasses import replace

from backfill.domain.usage import UsageEntry


class MemoryUsageMixin:
    _lock: threading.Lock

    def _init_usage(self) -> None:
        self._ledger: dict[str, UsageEntry] = {}

    def _insert_usage(self, entry: UsageEntry) -> bool:
        if entry.ref in self._ledger:
            return False
        self._ledger[entry.ref] = replace(entry, seq=len(self._ledger) + 1)
        return True

    def record_usage(self, entry: UsageEntry) -> bool:
        with self._lock:
            return self._insert_usage(entry)

    def usage_entries(
        self,
        *,
        start: int | None = None,
        end: int | None = None,
        project_id: str | None = None,
        batch_id: str | None = None,
        after_seq: int = 0,
        limit: int = 1000,
    ) -> list[UsageEntry]:
        with self._lock:
            found = [
                e
                for e in self._ledger.values()
                if e.seq > after_seq
                and (start is None or e.at >= start)
                and (end is None or e.at < end)
                and project_id in (None, e.project_id)
                and batch_id in (None, e.batch_id)
            ]
            return found[:limit]
