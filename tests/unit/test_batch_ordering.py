"""Ordering across batches (pure): at-risk first, fair shares by weight, earliest deadline;
the ETA and the admission warning."""

from __future__ import annotations

from backfill.domain.ordering import (
    Candidate,
    admission_warning,
    at_risk,
    estimated_completion,
    order_candidates,
)

NOW = 10_000.0


def cand(
    bid: str,
    project: str,
    expires_at: int,
    *,
    seq: int = 0,
    total: int = 100,
    done: int = 0,
    started: int | None = None,
) -> Candidate:
    return Candidate(bid, project, seq, expires_at, total, done, started)


def ids(cs: list[Candidate]) -> list[str]:
    return [c.batch_id for c in cs]


def test_eta_from_rate_so_far() -> None:
    assert estimated_completion(100, 0, 9_000, NOW) is None
    assert estimated_completion(100, 10, None, NOW) is None
    # 10 done in 1000 s -> 90 left take 9000 s
    assert estimated_completion(100, 10, 9_000, NOW) == NOW + 9_000


def test_at_risk() -> None:
    assert at_risk(cand("a", "p", 15_000, done=10, started=9_000), NOW)
    assert not at_risk(cand("a", "p", 20_000, done=10, started=9_000), NOW)
    assert not at_risk(cand("a", "p", 10_001), NOW)  # no rate yet: no evidence


def test_deadline_first_then_age() -> None:
    cs = [
        cand("late", "p", 30_000, seq=1),
        cand("soon", "p", 20_000, seq=2),
        cand("soon-old", "p", 20_000, seq=0),
    ]
    assert ids(order_candidates(cs, {}, None, NOW)) == ["soon-old", "soon", "late"]


def test_fair_share_prefers_the_project_with_fewer_leases_per_weight() -> None:
    cs = [cand("a1", "a", 11_000), cand("b1", "b", 90_000)]
    assert ids(order_candidates(cs, {"a": 2, "b": 1}, None, NOW))[0] == "b1"
    assert ids(order_candidates(cs, {"a": 2, "b": 1}, {"a": 4.0}, NOW))[0] == "a1"
    assert ids(order_candidates(cs, {}, None, NOW))[0] == "a1"  # tie: deadline


def test_at_risk_beats_fair_share() -> None:
    risky = cand("risky", "a", 15_000, done=10, started=9_000)
    cs = [cand("b1", "b", 12_000), risky]
    assert ids(order_candidates(cs, {"a": 5, "b": 0}, None, NOW))[0] == "risky"


def test_admission_warning() -> None:
    assert admission_warning(100, 20_000, 0, None, NOW) is None  # nothing measured
    assert admission_warning(100, 20_000, 0, 1.0, NOW) is None  # 100 s: fits
    text = admission_warning(100, 20_000, 50_000, 1.0, NOW)
    assert text is not None and "50000 requests due before it" in text
