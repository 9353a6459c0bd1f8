"""The in-process engine's per-request sampling (`backfill.engines.cb_sampling`), which imports
torch and transformers: here rather than in `tests/unit`, so the unit tier never pays for them."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from backfill.engines.cb_sampling import uniform


def test_seeded_uniforms_are_counter_based() -> None:
    draws = [uniform(42, 0, step) for step in range(1000)]
    assert draws == [uniform(42, 0, step) for step in range(1000)]
    assert all(0 <= u < 1 for u in draws)
    assert 0.45 < sum(draws) / len(draws) < 0.55
    assert uniform(42, 1, 0) != uniform(42, 0, 0) != uniform(43, 0, 0)
