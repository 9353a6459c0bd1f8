"""The governor's reference peaks in the SQL store: one row per model, replaced on every save
(an upsert: several workers' governors of one model may save at once; the last one wins, and
any of them is a fair peak)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Connection, select

from backfill.store.base import GovernorPeak
from backfill.store.schema import governor_peaks

T = TypeVar("T")


class SqlPeaksMixin:
    _postgres: bool

    def _run(self, work: Callable[[Connection], T], *, write: bool = True) -> T:
        raise NotImplementedError

    def save_governor_peak(self, model: str, reference: float, now: float) -> None:
        insert: Any
        if self._postgres:
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        values = {"reference": float(reference), "saved_at": float(now)}
        statement = (
            insert(governor_peaks)
            .values(model=model, **values)
            .on_conflict_do_update(index_elements=["model"], set_=values)
        )
        self._run(lambda conn: conn.execute(statement))

    def governor_peak(self, model: str) -> GovernorPeak | None:
        query = select(governor_peaks).where(governor_peaks.c.model == model)
        row = self._run(lambda conn: conn.execute(query).first(), write=False)
        if row is None:
            return None
        return GovernorPeak(row.model, float(row.reference), float(row.saved_at))
