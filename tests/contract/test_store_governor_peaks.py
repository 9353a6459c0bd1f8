"""The governor's reference peak on every store backend: saved per model, replaced by the next
save, read by another process (`dispatch/governor.py` keeps it across restarts)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from backfill.store.base import GovernorPeak

if TYPE_CHECKING:
    from conftest import Backend

T0 = 1_700_000_000.5


def test_a_saved_peak_is_read_back_by_another_process(backend: Backend) -> None:
    first = backend.store()
    assert first.governor_peak("llama") is None
    first.save_governor_peak("llama", 42.5, T0)
    first.save_governor_peak("mistral", 7.0, T0 + 1)
    other = backend.store()
    assert other.governor_peak("llama") == GovernorPeak("llama", 42.5, T0)
    assert other.governor_peak("mistral") == GovernorPeak("mistral", 7.0, T0 + 1)
    assert other.governor_peak("qwen") is None


def test_the_next_save_replaces_the_last(backend: Backend) -> None:
    store = backend.store()
    store.save_governor_peak("llama", 42.5, T0)
    backend.store().save_governor_peak("llama", 12.0, T0 + 30)
    assert store.governor_peak("llama") == GovernorPeak("llama", 12.0, T0 + 30)
