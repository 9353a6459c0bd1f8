"""The usage ledger in `MemoryStore`, the twin of `sql_usage.py`: entries by `ref`, in
insertion order, under the store's one lock (`_insert_usage` is for callers holding it)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from backfill.domain.usage import BATCH, UsageEntry
from backfill.domain.usage_reports import GROUP_KEYS, SUMMED, UsageTotal, sort_key


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

    def usage_totals(
        self,
        *,
        start: int,
        end: int,
        width: int,
        group_by: Sequence[str] = (),
        project_ids: Sequence[str] | None = None,
        api_key_ids: Sequence[str] | None = None,
        models: Sequence[str] | None = None,
        endpoints: Sequence[str] | None = None,
        batch: bool | None = None,
    ) -> list[UsageTotal]:
        unknown = set(group_by) - set(GROUP_KEYS)
        if unknown:
            raise ValueError(f"cannot group usage by {sorted(unknown)}")

        def keep(e: UsageEntry) -> bool:
            return (
                start <= e.at < end
                and (project_ids is None or e.project_id in project_ids)
                and (api_key_ids is None or e.api_key_id in api_key_ids)
                and (models is None or e.model in models)
                and (endpoints is None or e.endpoint in endpoints)
                and (batch is None or (e.kind == BATCH) == batch)
            )

        groups: dict[tuple[Any, ...], dict[str, int]] = {}
        with self._lock:
            for e in self._ledger.values():
                if not keep(e):
                    continue
                values = {
                    "project_id": e.project_id,
                    "api_key_id": e.api_key_id,
                    "model": e.model,
                    "batch": e.kind == BATCH,
                    "currency": e.currency,
                }
                bucket = start + (e.at - start) // width * width
                key: tuple[Any, ...] = (
                    bucket,
                    *((k, values[k]) for k in GROUP_KEYS if k in group_by),
                )
                sums = groups.setdefault(key, dict.fromkeys(SUMMED, 0))
                for name in SUMMED:
                    sums[name] += getattr(e, name)
        totals = []
        for key, sums in groups.items():
            fields: dict[str, Any] = {"bucket": key[0], **dict(key[1:]), **sums}
            totals.append(UsageTotal(**fields))
        return sorted(totals, key=sort_key)
