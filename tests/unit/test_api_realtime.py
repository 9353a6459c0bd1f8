"""Pieces of the real-time gateway without sockets: token buckets, the limiter, estimates."""

from __future__ import annotations

import pytest

from backfill.api.realtime import RateLimiter, TokenBucket, estimate_tokens
from backfill.errors import RateLimited


def test_bucket_starts_full_and_refills() -> None:
    bucket = TokenBucket(capacity=3, rate=1.0)
    assert [bucket.take(1, 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(1, 0.0) == pytest.approx(1.0)
    assert bucket.take(1, 0.5) == pytest.approx(0.5)
    assert bucket.take(1, 1.0) == 0.0


def test_bucket_lets_one_oversized_request_through_a_full_bucket() -> None:
    bucket = TokenBucket(capacity=10, rate=1.0)
    assert bucket.take(50, 0.0) == 0.0
    assert bucket.take(1, 0.0) > 0


def test_limiter_requests_per_minute_per_project() -> None:
    now = [0.0]
    limiter = RateLimiter(rpm=2, clock=lambda: now[0])
    limiter.check("p1", 1)
    limiter.check("p1", 1)
    with pytest.raises(RateLimited) as info:
        limiter.check("p1", 1)
    assert info.value.retry_after == pytest.approx(30.0)
    limiter.check("p2", 1)  # another project has its own bucket
    now[0] = 30.0
    limiter.check("p1", 1)


def test_limiter_tokens_per_minute_gives_the_request_slot_back() -> None:
    limiter = RateLimiter(rpm=10, tpm=100, clock=lambda: 0.0)
    limiter.check("p", 90)
    with pytest.raises(RateLimited, match="tokens per minute"):
        limiter.check("p", 50)
    for _ in range(8):  # 1 used + 8 = 9 of 10: the refused one did not count
        limiter.check("p", 0)


def test_limiter_off() -> None:
    limiter = RateLimiter(rpm=0, clock=lambda: 0.0)
    for _ in range(10_000):
        limiter.check("p", 1_000_000)


def test_estimate_tokens() -> None:
    assert estimate_tokens(b"x" * 400, {"max_tokens": 50}) == 150
    assert estimate_tokens(b"x" * 40, {"max_completion_tokens": 5}) == 15
    assert estimate_tokens(b"x" * 40, {"max_tokens": "lots"}) == 10
