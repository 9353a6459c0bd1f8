"""The governor's reference peaks in `MemoryStore`, the twin of `sql_peaks.py`."""

from __future__ import annotations

import threading

from backfill.store.base import GovernorPeak


class MemoryPeaksMixin:
    _lock: threading.Lock

    def _init_peaks(self) -> None:
        self._peaks: dict[str, GovernorPeak] = {}

    def save_governor_peak(self, model: str, reference: float, now: float) -> None:
        with self._lock:
            self._peaks[model] = GovernorPeak(model, float(reference), float(now))

    def governor_peak(self, model: str) -> GovernorPeak | None:
        with self._lock:
            return self._peaks.get(model)
